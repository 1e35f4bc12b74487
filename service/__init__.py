"""The online service: HTTP (FastAPI) and gRPC front ends, batcher, feature store, metrics, settings.

Layout: settings.py (configuration), schemas.py (request bodies and limits), http_api.py and
grpc_api.py (front ends), recommend.py (the use cases both share), batcher.py (queue + inference
worker), features.py (Redis / embedded feature store), models.py (model lifecycle and hot swap),
metrics.py, capture.py (traffic capture), logs.py, server.py (process wiring and shutdown),
cli.py (`onerec serve`, `onerec features load`), proto_gen.py (gRPC stubs).
"""
