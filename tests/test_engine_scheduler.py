"""The engine's scheduler, driven directly (no sockets, no process) on the small demo model.

What is checked is what DESIGN.md section 5 promises of the engine: a request joins the running rows
between decode steps (it never waits for a batch that started before it), batch-at-a-time is kept
behind a setting for comparison, deadlines drop work queued or mid-search, the row budget bounds the
live rows, a cancelled request frees its rows, versions in flight finish on their own model, live
catalogue edits apply between steps, and the answer does not depend on what else is running.
"""

from __future__ import annotations

import time
from typing import Any

from service.engine import messages as msg
from service.engine.scheduler import Scheduler, _Version

FAR = 3600.0  # seconds: a deadline no test machine can miss


def make(demo_bundle: Any, **kwargs: Any) -> tuple[Scheduler, list[Any]]:
    """A scheduler serving the demo bundle as version 1, and the list its replies land in."""
    from onerec.generate import StepSearch

    out: list[Any] = []
    scheduler = Scheduler(out.append, **kwargs)
    scheduler.versions[1] = _Version(demo_bundle, StepSearch(demo_bundle.generator))
    scheduler.current = 1
    return scheduler, out


def submit(rid: int, history: list[int], mode: str = "items", beam: int = 8, num: int = 5, **kw: Any) -> msg.Submit:
    fields: dict[str, Any] = {
        "id": rid,
        "version": 1,
        "history": history,
        "num_items": num,
        "mode": mode,
        "beam_width": beam,
        "exclude": [],
        "exclude_history": True,
        "user_id": f"u{rid}",
        "deadline": time.monotonic() + FAR,
    }
    fields.update(kw)
    return msg.Submit(**fields)


def run_until_done(scheduler: Scheduler, out: list[Any], ids: set[int], max_steps: int = 500) -> dict[int, Any]:
    """Step until every id got an answer; {id: (answer, step number it arrived at)}."""
    answers: dict[int, Any] = {}
    for number in range(1, max_steps + 1):
        scheduler.step()
        for reply in out:
            if isinstance(reply, (msg.Finished, msg.Failed)) and reply.id in ids and reply.id not in answers:
                answers[reply.id] = (reply, number)
        if ids <= set(answers):
            return answers
    raise AssertionError(f"no answer for {ids - set(answers)} after {max_steps} steps")


def items_of(reply: Any) -> list[int]:
    assert isinstance(reply, msg.Finished), reply
    return [item for item, _, _ in reply.items]


def test_items_request_joins_a_running_session_and_finishes_first(demo_bundle: Any) -> None:
    scheduler, out = make(demo_bundle)
    depth = demo_bundle.config.depth
    scheduler.handle(submit(1, [3, 4, 5], mode="session", beam=16, num=10))
    for _ in range(2):
        scheduler.step()  # the session is two steps in
    scheduler.handle(submit(2, [7, 8], mode="items", beam=8))
    answers = run_until_done(scheduler, out, {1, 2})
    (session, session_at), (items, items_at) = answers[1], answers[2]
    assert isinstance(items, msg.Finished) and isinstance(session, msg.Finished)
    assert items.steps == depth, "an items request takes one step per code level"
    assert items_at == depth < session_at, "the items request waited for the running session"


def test_batch_mode_makes_a_new_request_wait_for_the_running_batch(demo_bundle: Any) -> None:
    scheduler, out = make(demo_bundle, mode="batch")
    scheduler.handle(submit(1, [3, 4, 5], mode="session", beam=16, num=10))
    scheduler.step()
    scheduler.handle(submit(2, [7, 8], mode="items", beam=8))
    answers = run_until_done(scheduler, out, {1, 2})
    assert answers[2][1] > answers[1][1], "batch-at-a-time must not admit into a running batch"


def test_answers_do_not_depend_on_what_else_runs(demo_bundle: Any) -> None:
    requests = [
        submit(1, [3, 4, 5], mode="session", beam=16, num=10),
        submit(2, [7, 8], mode="items", beam=8, num=5),
        submit(3, [11, 12, 13, 14], mode="items", beam=24, num=12),
        submit(4, [20], mode="session", beam=4, num=5, exclude=[21, 22]),
    ]
    alone = {}
    for request in requests:
        scheduler, out = make(demo_bundle)
        scheduler.handle(request)
        alone[request.id] = items_of(run_until_done(scheduler, out, {request.id})[request.id][0])
    scheduler, out = make(demo_bundle)
    for request in requests:  # a static batch
        scheduler.handle(request)
    together = run_until_done(scheduler, out, {r.id for r in requests})
    assert {rid: items_of(a[0]) for rid, a in together.items()} == alone
    scheduler, out = make(demo_bundle)  # each joining the running rows a step after the previous one
    for request in requests:
        scheduler.handle(request)
        scheduler.step()
    staggered = run_until_done(scheduler, out, {r.id for r in requests})
    assert {rid: items_of(a[0]) for rid, a in staggered.items()} == alone


def test_row_budget_bounds_the_live_rows(demo_bundle: Any) -> None:
    scheduler, out = make(demo_bundle, max_rows=20)
    for rid in range(1, 4):
        scheduler.handle(submit(rid, [rid], mode="items", beam=8))
    scheduler.step()
    assert scheduler.live_rows == 16 and len(scheduler.waiting) == 1
    run_until_done(scheduler, out, {1, 2, 3})
    wide = submit(9, [5], mode="items", beam=64)  # wider than the budget alone: still admitted when idle
    scheduler.handle(wide)
    assert isinstance(run_until_done(scheduler, out, {9})[9][0], msg.Finished)


def test_deadline_drops_queued_and_running_requests(demo_bundle: Any) -> None:
    scheduler, out = make(demo_bundle, max_requests=1)
    scheduler.handle(submit(1, [3], mode="session", beam=8, num=10))
    scheduler.step()
    scheduler.handle(submit(2, [4], deadline=time.monotonic() - 1))  # queued behind request 1, already late
    scheduler.versions[1].live[1].submit.deadline = time.monotonic() - 1  # request 1's deadline passes mid-search
    answers = run_until_done(scheduler, out, {1, 2})
    assert [answers[i][0].kind for i in (1, 2)] == ["deadline", "deadline"]
    assert "mid-search" in answers[1][0].message and "queued" in answers[2][0].message
    assert scheduler.live_rows == 0 and not scheduler.waiting


def test_cancel_frees_the_rows_at_once(demo_bundle: Any) -> None:
    scheduler, out = make(demo_bundle)
    scheduler.handle(submit(1, [3], mode="session", beam=16, num=10))
    scheduler.step()
    assert scheduler.live_rows == 16
    scheduler.handle(msg.Cancel(1))
    assert scheduler.live_rows == 0 and scheduler.backlog() == 0
    scheduler.step()
    assert not [r for r in out if isinstance(r, (msg.Finished, msg.Failed))]


def test_unknown_version_is_refused_not_queued(demo_bundle: Any) -> None:
    scheduler, out = make(demo_bundle)
    scheduler.handle(submit(1, [3], version=7))
    assert isinstance(out[-1], msg.Failed) and out[-1].kind == "not_loaded"


def test_a_superseded_version_finishes_its_rows_then_is_dropped(demo_bundle: Any) -> None:
    from onerec.generate import StepSearch

    scheduler, out = make(demo_bundle)
    scheduler.handle(submit(1, [3], mode="session", beam=8, num=10))
    scheduler.step()
    scheduler.versions[2] = _Version(demo_bundle, StepSearch(demo_bundle.generator))  # a hot reload lands
    scheduler.current = 2
    scheduler.handle(submit(2, [3], mode="session", beam=8, num=10, version=2, user_id="u1"))
    answers = run_until_done(scheduler, out, {1, 2})
    assert items_of(answers[1][0]) == items_of(answers[2][0])
    scheduler.step()
    assert set(scheduler.versions) == {2}


def test_catalogue_edits_apply_between_steps(demo_bundle: Any) -> None:
    catalog = demo_bundle.catalog
    scheduler, out = make(demo_bundle)
    scheduler.handle(submit(1, [3, 4], mode="items", beam=16, num=10))
    top = items_of(run_until_done(scheduler, out, {1})[1][0])
    gone = [catalog.item_ids[i] for i in top[:3]]
    try:
        scheduler.handle(msg.CatalogChange(5, 1, withdraw=gone))
        assert isinstance(out[-1], msg.ControlDone) and out[-1].ok
        scheduler.handle(submit(2, [3, 4], mode="items", beam=16, num=10))
        after = items_of(run_until_done(scheduler, out, {2})[2][0])
        assert not set(after) & set(top[:3]) and len(after) == 10
        scheduler.handle(msg.CatalogChange(6, 1, withdraw=["no-such-item"]))
        assert isinstance(out[-1], msg.ControlDone) and not out[-1].ok and "no-such-item" in out[-1].message
    finally:
        catalog.restore(gone)  # the bundle is shared by the module's tests
    assert all(catalog.is_live(i) for i in top[:3])


def test_a_version_is_built_with_the_kernel_backend_the_engine_was_given(demo_store: Any, monkeypatch: Any) -> None:
    """Settings.kernels reaches the generator through the engine (EngineConfig -> Scheduler -> load_bundle)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    answers: dict[str, msg.ControlDone] = {}
    for backend in ("torch", "triton"):
        out: list[Any] = []
        scheduler = Scheduler(out.append, kernels=backend)
        scheduler.handle(msg.LoadModel(id=1, path=str(demo_store / "demo" / "1"), overlay=None))
        for _ in range(6000):
            scheduler.step()
            if out:
                break
            time.sleep(0.01)
        answers[backend] = out[0]
        if backend == "torch":
            assert scheduler.versions[1].bundle.generator.kernel_backend == "torch"
    assert answers["torch"].ok
    # forced Triton on a CPU host: the warm-up's first dispatch refuses it, so the engine refuses the version
    assert not answers["triton"].ok and "KernelBackendError" in answers["triton"].message
