"""The serving benchmark without HTTP: both models in this process (``--model-only``, ``--profile``).

``model_only`` times our ``Generator`` (alone and batched) against HF ``generate`` one request at a
time, on CPU or GPU, for machines without the web stack or to see the models apart from their
servers. ``profile_batch`` times the pieces of one batch on our side and of one request on the
alternative's, with a device sync around each piece.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.hf_baseline import HFRecommender
from benchmarks.workload import NUM_ITEMS, Row, known_indices, load_spec, log, make_records
from loadtest.report import latency_summary_ms


def model_only(
    store: Path,
    name: str | None,
    device: str,
    rows: Sequence[Row],
    history_length: int,
    reps: int,
    batch: int,
) -> dict[str, Any]:
    """In-process: our Generator (alone and batched) against HF generate (one request at a time)."""
    import torch

    from onerec.bundle import load_newest_bundle
    from onerec.generate import RecRequest

    bundle, _ = load_newest_bundle(store, name, device=device)
    spec = load_spec(store, name)
    hf = HFRecommender(spec, device=device)
    out_rows = []
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for row in rows:
        records = make_records(spec, row, history_length, users=max(batch, reps))
        requests = [
            RecRequest(
                history=known_indices(bundle, r.history or ()),
                num_items=NUM_ITEMS,
                mode=row.mode,
                beam_width=row.beam_width,
                user_id=r.user_id,
            )
            for r in records
        ]
        bodies = [r.request_body() for r in records]

        def timed(fn: Any, n: int) -> list[float]:
            fn(0)
            fn(1)
            times = []
            for i in range(n):
                sync()
                start = time.perf_counter()
                fn(i)
                sync()
                times.append(time.perf_counter() - start)
            return times

        ours_single = timed(lambda i, rs=requests: bundle.generator.generate([rs[i % len(rs)]]), reps)
        ours_batch = timed(lambda i, rs=requests: bundle.generator.generate(rs[:batch]), max(3, reps // 4))
        hf_single = timed(lambda i, bs=bodies: hf.recommend(bs[i % len(bs)]), max(3, reps // 2))
        ours_p50 = latency_summary_ms(ours_single)["p50"]
        hf_p50 = latency_summary_ms(hf_single)["p50"]
        batch_p50 = latency_summary_ms(ours_batch)["p50"]
        ours_rps = batch / (batch_p50 / 1000.0)
        hf_rps = 1000.0 / hf_p50
        out_rows.append(
            {
                "device": device,
                "mode": row.mode,
                "beam_width": row.beam_width,
                "batch": batch,
                "onerec_single_p50_ms": ours_p50,
                "onerec_batch_p50_ms": batch_p50,
                "onerec_rps": round(ours_rps, 2),
                "hf_single_p50_ms": hf_p50,
                "hf_rps": round(hf_rps, 2),
                "rps_ratio": round(ours_rps / hf_rps, 3),
                "latency_ratio": round(hf_p50 / ours_p50, 3),
            }
        )
        log(json.dumps(out_rows[-1]))
    return {
        "benchmark": "serving-model-only",
        "device": device,
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if device.startswith("cuda") else None,
        "model": {
            "name": spec["name"],
            "version": spec["version"],
            "config": spec["model_config"],
            "catalog_size": len(spec["item_ids"]),
            "parameters": spec["parameters"],
        },
        "history_length": history_length,
        "method": "in-process, no HTTP; ours: Generator.generate on 1 request and on a batch; HF: "
        "generate(num_beams, prefix_allowed_tokens_fn) one request at a time; p50 of repetitions; "
        "HF weights random",
        "rows": out_rows,
    }


class Timers:
    """Wall time per named piece, collected by wrapping functions (with a device sync around each)."""

    def __init__(self, sync: Any) -> None:
        self.sync = sync
        self.seconds: dict[str, float] = {}
        self.calls: Counter[str] = Counter()

    def wrap(self, name: str, fn: Any) -> Any:
        def timed(*args: Any, **kwargs: Any) -> Any:
            self.sync()
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.sync()
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
                self.calls[name] += 1

        return timed

    def table(self, divide: int) -> dict[str, Any]:
        return {
            name: {"ms": round(1000 * self.seconds[name] / divide, 3), "calls": self.calls[name] // divide}
            for name in sorted(self.seconds, key=lambda n: -self.seconds[n])
        }


def profile_batch(
    store: Path, name: str | None, device: str, row: Row, batch: int, history_length: int, reps: int
) -> dict[str, Any]:
    """Time the pieces of one batch of ``batch`` requests in-process (ours) and of one HF request."""
    import torch

    import onerec.generate as generate_module
    import onerec.model as model_module
    from onerec.bundle import load_newest_bundle
    from onerec.generate import RecRequest

    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    bundle, _ = load_newest_bundle(store, name, device=device)
    spec = load_spec(store, name)
    records = make_records(spec, row, history_length, users=batch)
    requests = [
        RecRequest(history=known_indices(bundle, r.history or ()), num_items=NUM_ITEMS, mode=row.mode,
                   beam_width=row.beam_width, user_id=r.user_id)
        for r in records
    ]  # fmt: skip
    generator, model = bundle.generator, bundle.model
    generator.generate(requests)  # warm
    timers = Timers(sync)
    originals: dict[str, Any] = {
        "trie_topk": generate_module.trie_topk,
        "moe": model_module.moe,
    }
    setattr(generate_module, "trie_topk", timers.wrap("decode: trie_topk kernel", originals["trie_topk"]))  # noqa: B010
    setattr(model_module, "moe", timers.wrap("decode: moe kernel (inside decoder)", originals["moe"]))  # noqa: B010
    patched = {
        (model, "prepare_decoding"): "encode (encoder + cross K/V)",
        (model, "decode_step"): "decode: decoder layers + head (incl. moe)",
        (generator, "_request_bans"): "request bans (history, exclude)",
        (generator, "_with_session_bans"): "decode: session bans",
        (generator, "_encoder_inputs"): "encoder inputs",
        (generator, "_collect"): "collect answers",
        (generator, "generate"): "total generate()",
    }
    for (owner, attr), label in patched.items():
        setattr(owner, attr, timers.wrap(label, getattr(owner, attr)))
    try:
        for _ in range(reps):
            generator.generate(requests)
    finally:
        setattr(generate_module, "trie_topk", originals["trie_topk"])  # noqa: B010
        setattr(model_module, "moe", originals["moe"])  # noqa: B010
        for owner, attr in patched:
            delattr(owner, attr)  # back to the class attribute
    ours = timers.table(reps)

    hf = HFRecommender(spec, device=device)
    body = records[0].request_body()
    hf.recommend(body)
    hf_timers = Timers(sync)
    hf.model.forward = hf_timers.wrap("T5 forward (encoder + decoder steps)", hf.model.forward)
    original_prefix_fn = hf._prefix_fn

    def timed_prefix_fn(banned: set[int]) -> Any:
        return hf_timers.wrap("prefix_allowed_tokens_fn (Python, per beam per step)", original_prefix_fn(banned))

    hf._prefix_fn = timed_prefix_fn  # type: ignore[method-assign]
    hf.recommend = hf_timers.wrap("total generate() + collect", hf.recommend)  # type: ignore[method-assign]
    for _ in range(reps):
        hf.recommend(body)
    return {
        "device": device,
        "row": {"mode": row.mode, "beam_width": row.beam_width},
        "history_length": history_length,
        "onerec_batch": batch,
        "onerec_ms_per_batch": ours,
        "hf_ms_per_request": hf_timers.table(reps),
        "note": "wall time with a device sync around each timed piece; nested pieces are included in their "
        "parents (moe inside decoder layers, everything inside total)",
    }
