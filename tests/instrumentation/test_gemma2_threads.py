"""Gemma 2 instrumentation under threads: install/uninstall races, uninstall during a forward, runs after uninstall.

SPEC §5: installing, uninstalling and running from several threads at once never leaves transformers
patched or a run active, and a failure leaves the model clean.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
import transformers.models.gemma2.modeling_gemma2 as modeling_gemma2

import instrumentation.gemma2 as g2
from mishax_py import InstrumentedModel
from mishax_py.interventions import Hook
from mishax_py.runtime import active_context
from tests.helpers import REPO_ROOT

pytestmark = pytest.mark.usefixtures("one_thread")

# The race test's driver, run in a fresh interpreter: it imports everything (no patcher built, nothing
# installed, no tensor op yet) and forks one child per round, so each child starts as a fresh process would
# (a fresh interpreter per round would spend ~4 s per round importing torch and transformers). In each child,
# 8 threads call install()/uninstall() in random order while 2 more run forwards: plain model(ids) calls
# and im.run(ids) of an InstrumentedModel built without installing anything. A child exits 0 when, after
# the threads, every patched function's code `is` the original recorded before the first install, a
# plain forward equals the unpatched logits, no thread was left in a run, and install() works again.
RACE_DRIVER = r"""
import os, random, sys, threading, traceback
import torch
import transformers.models.gemma2.modeling_gemma2 as modeling_gemma2
import instrumentation.gemma2 as g2
from mishax_py import InstrumentedModel
from mishax_py.runtime import active_context
from tests.helpers import make_model

ROUNDS, PARALLEL, INSTALLERS, CALLS = (int(a) for a in sys.argv[1:5])


def innermost(target):
    obj = modeling_gemma2
    for part in target.split("."):
        obj = getattr(obj, part)
    while hasattr(obj, "__wrapped__"):
        obj = obj.__wrapped__
    return obj


def one_round(seed):
    torch.set_num_threads(1)
    sys.setswitchinterval(1e-5)  # switch threads often: widens every race window
    originals = {t: innermost(t).__code__ for t in g2.PATCHES}  # before the first install of this process
    model = make_model()
    ids = torch.randint(4, 64, (1, 6), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        ref = model(ids).logits
    im = InstrumentedModel(model, g2.build_catalogue(model), g2.Gemma2Family(model.config))  # nothing installed
    barrier = threading.Barrier(INSTALLERS + 2)
    done = threading.Event()
    problems = []

    def installer(i):
        rng = random.Random(seed * 100 + i)
        try:
            barrier.wait(timeout=60)
            for _ in range(CALLS):
                (g2.install if rng.random() < 0.5 else g2.uninstall)()
        except BaseException as e:
            problems.append(f"installer {i}: {e!r}\n{traceback.format_exc()}")

    def runner(plain):
        try:
            barrier.wait(timeout=60)
            while not done.is_set():
                with torch.no_grad():
                    if plain:
                        out = model(ids).logits
                    else:
                        try:
                            out = im.run(ids)
                        except RuntimeError as e:  # a run started while uninstalled: refused, naming install()
                            if "install()" not in str(e):
                                raise
                            continue
                if not torch.equal(out, ref):
                    problems.append(f"{'plain' if plain else 'im.run'} forward differs from the unpatched logits")
            if active_context() is not None:
                problems.append("a run is still active in a runner thread")
        except BaseException as e:
            problems.append(f"{'plain' if plain else 'im.run'} runner: {e!r}\n{traceback.format_exc()}")

    installers = [threading.Thread(target=installer, args=(i,)) for i in range(INSTALLERS)]
    runners = [threading.Thread(target=runner, args=(p,)) for p in (True, False)]
    for t in installers + runners:
        t.start()
    for t in installers:
        t.join()
    done.set()
    for t in runners:
        t.join()
    try:
        g2.uninstall()
        left = [t for t in g2.PATCHES if innermost(t).__code__ is not originals[t]]
        if left:
            problems.append(f"still patched after uninstall(): {left}")
        with torch.no_grad():
            if not torch.equal(model(ids).logits, ref):
                problems.append("plain forward after uninstall() differs from the unpatched logits")
            g2.install()
            if not torch.equal(im.run(ids), ref):
                problems.append("im.run after install() differs from the unpatched logits")
            if len(im.run_with_cache(ids)[1]) != len(im.site_names()):
                problems.append("install() did not instrument every site")
        g2.uninstall()
        if any(innermost(t).__code__ is not originals[t] for t in g2.PATCHES):
            problems.append("the second uninstall() did not restore the originals")
        if active_context() is not None:
            problems.append("a run is still active in the main thread")
    except BaseException as e:
        problems.append(f"after the threads: {e!r}\n{traceback.format_exc()}")
    return problems


failed, running = 0, {}
for seed in range(ROUNDS):
    if len(running) >= PARALLEL:
        pid, status = os.wait()
        failed += os.waitstatus_to_exitcode(status) != 0
        running.pop(pid)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            problems = one_round(seed)
            for p in problems[:3]:
                print(f"round {seed}: {p}", flush=True)
            code = 1 if problems else 0
        finally:
            os._exit(code)
    running[pid] = seed
while running:
    pid, status = os.wait()
    failed += os.waitstatus_to_exitcode(status) != 0
    running.pop(pid)
print(f"{failed} of {ROUNDS} rounds failed", flush=True)
sys.exit(1 if failed else 0)
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="the driver forks its fresh processes")
def test_concurrent_install_uninstall_and_runs_in_fresh_processes(tmp_path: Path) -> None:
    """Issue 13 A1: 8 threads installing and uninstalling in random order (and 2 running forwards), in 20
    fresh processes. Before the lock every round failed: a second thread recorded patched code as the original."""
    proc = subprocess.run(
        [sys.executable, "-c", RACE_DRIVER, "20", "4", "8", "40"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
        # TMPDIR: each process's folder of patched sources goes where pytest cleans up
        env={**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TMPDIR": str(tmp_path)},
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-6000:]
    assert "0 of 20 rounds failed" in proc.stdout


def _code(target: str) -> object:
    """The code object transformers' ``target`` (``"Class.method"``, decorators unwrapped) runs now."""
    obj: object = modeling_gemma2
    for part in target.split("."):
        obj = getattr(obj, part)
    while hasattr(obj, "__wrapped__"):
        obj = obj.__wrapped__
    return obj.__code__  # type: ignore[attr-defined]


@pytest.fixture
def installed_after() -> Iterator[None]:
    """The test may uninstall; the patches are installed again afterwards (as every other test expects)."""
    yield
    g2.install()


def _in_thread(fn: Callable[[], torch.Tensor]) -> tuple[threading.Thread, list[object]]:
    out: list[object] = []

    def target() -> None:
        try:
            with torch.no_grad():
                out.append(fn())
        except BaseException as e:  # noqa: BLE001 - checked by the test
            out.append(e)
        out.append(active_context())

    thread = threading.Thread(target=target)
    thread.start()
    return thread, out


@pytest.mark.usefixtures("installed_after")
def test_uninstall_during_a_plain_forward_lets_it_finish(tiny_model, ids: torch.Tensor) -> None:
    """Issue 13 A2: a plain ``model(ids)`` paused inside layer 0's MLP (a torch pre-hook waiting on an event)
    while another thread uninstalls: the patched frames above it (the decoder layer's and the model's forward)
    finish with the names they call, and the logits are the unpatched ones."""
    g2.install()
    with torch.no_grad():
        ref = tiny_model(ids).logits
    inside, release = threading.Event(), threading.Event()

    def pause(module: torch.nn.Module, args: tuple) -> None:
        inside.set()
        assert release.wait(timeout=30)

    handle = tiny_model.model.layers[0].mlp.register_forward_pre_hook(pause)
    try:
        thread, out = _in_thread(lambda: tiny_model(ids).logits)
        assert inside.wait(timeout=30)
        g2.uninstall()
        release.set()
        thread.join()
    finally:
        handle.remove()
    assert not isinstance(out[0], BaseException), out[0]
    assert isinstance(out[0], torch.Tensor) and torch.equal(out[0], ref)
    assert out[1] is None and not g2.installed()


@pytest.mark.usefixtures("installed_after")
def test_uninstall_during_a_run_lets_it_finish_and_the_next_run_is_refused(tiny_model, ids: torch.Tensor) -> None:
    """Issue 13 A2 and B3: an ``im.run`` paused at a site (a Hook waiting on an event) while another thread
    uninstalls finishes with the same logits and leaves no run active; the next run is refused, naming
    ``install()``, instead of silently installing again."""
    im = g2.instrument(tiny_model)
    with torch.no_grad():
        ref = im.run(ids)
    inside, release = threading.Event(), threading.Event()

    def pause(value: torch.Tensor) -> torch.Tensor:
        inside.set()
        assert release.wait(timeout=30)
        return value

    thread, out = _in_thread(lambda: im.run(ids, interventions={"blocks.0.mlp.pre": Hook(pause)}))
    assert inside.wait(timeout=30)
    g2.uninstall()
    release.set()
    thread.join()
    assert not isinstance(out[0], BaseException), out[0]
    assert isinstance(out[0], torch.Tensor) and torch.equal(out[0], ref)
    assert out[1] is None and active_context() is None
    with pytest.raises(RuntimeError, match=r"uninstall\(\).*instrumentation\.gemma2\.install\(\)"):
        im.run(ids)
    assert not g2.installed()
    with torch.no_grad():
        assert torch.equal(tiny_model(ids).logits, ref)  # the model is clean and unpatched


@pytest.mark.usefixtures("installed_after")
def test_installing_from_many_threads_while_running(tiny_im: InstrumentedModel, ids: torch.Tensor) -> None:
    """In-process companion of the fresh-process test: 8 threads install/uninstall while 2 threads run
    ``im.run_with_cache``; every completed run gives the unpatched logits and no thread is left in a run."""
    with torch.no_grad():
        ref = tiny_im.run(ids)
    g2.uninstall()
    originals = {t: _code(t) for t in g2.PATCHES}
    barrier = threading.Barrier(10)
    done = threading.Event()
    problems: list[str] = []

    def installer(i: int) -> None:
        rng = random.Random(i)
        barrier.wait(timeout=30)
        for _ in range(60):
            (g2.install if rng.random() < 0.5 else g2.uninstall)()

    def runner() -> None:
        barrier.wait(timeout=30)
        while not done.is_set():
            try:
                with torch.no_grad():
                    logits, _ = tiny_im.run_with_cache(ids, sites="blocks.1.resid_post")
                if not torch.equal(logits, ref):
                    problems.append("logits differ")
            except RuntimeError as e:
                if "install()" not in str(e):
                    problems.append(repr(e))
            except BaseException as e:  # noqa: BLE001 - reported below
                problems.append(repr(e))
        if active_context() is not None:
            problems.append("run left active")

    threads = [threading.Thread(target=installer, args=(i,)) for i in range(8)]
    runners = [threading.Thread(target=runner) for _ in range(2)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for t in threads + runners:
            t.start()
        for t in threads:
            t.join()
        done.set()
        for t in runners:
            t.join()
    assert not problems, problems[:5]
    g2.uninstall()
    assert all(_code(t) is originals[t] for t in g2.PATCHES)
    g2.install()
    with torch.no_grad():
        assert torch.equal(tiny_im.run(ids), ref)
