"""What both front ends share in one process: settings, metrics, models, engines, the use cases."""

from __future__ import annotations

from dataclasses import dataclass

from service.engine.client import EnginePool
from service.features import FeatureStore
from service.metrics import ServiceMetrics
from service.models import ModelManager
from service.recommend import RecommendService
from service.settings import Settings


@dataclass
class AppState:
    """One per front-end process; the HTTP and gRPC front ends both read it, neither owns it."""

    settings: Settings
    metrics: ServiceMetrics
    models: ModelManager
    service: RecommendService
    features: FeatureStore
    engines: EnginePool
    draining: bool = False

    @property
    def ready(self) -> bool:
        return self.models.current is not None and self.engines.ready and not self.draining
