"""ExpertCache and its policies on a synthetic store: eviction order, pinning, accounting."""

from __future__ import annotations

import gc
import threading
import time
import weakref

import pytest
import torch

from engine.host_experts import HostExperts
from engine.offload.cache import ExpertCache
from engine.offload.host_compute import HostCompute
from engine.offload.policy import LFUPolicy, LRUPolicy
from engine.offload.store import ExpertStore
from engine.offload.transfer import HIGH, LOW, Transfer, TransferEngine

CPU = torch.device("cpu")


def make_store(layers: int = 2, experts: int = 4, hidden: int = 8, inter: int = 4) -> ExpertStore:
    g = torch.Generator().manual_seed(0)
    host = HostExperts(
        {
            layer: {
                "w13": torch.randn(experts, 2 * inter, hidden, generator=g),
                "w2": torch.randn(experts, hidden, inter, generator=g),
            }
            for layer in range(layers)
        }
    )
    return ExpertStore(host, pin=False)


def make_cache(
    slots: int,
    policy: str = "lru",
    link_gbps: float | None = None,
    host: HostCompute | None = None,
) -> ExpertCache:
    store = make_store()
    pol = LRUPolicy() if policy == "lru" else LFUPolicy()
    return ExpertCache(store, slots, pol, TransferEngine(CPU, link_gbps), CPU, host)


def test_slots_hold_the_right_weights() -> None:
    cache = make_cache(3)
    for layer, expert in [(0, 3), (1, 2), (0, 1)]:
        (slot,) = cache.ensure(layer, [expert])
        w13, w2 = cache.store.expert(layer, expert).values()
        assert torch.equal(cache.slots.w13[slot], w13) and torch.equal(cache.slots.w2[slot], w2)
        cache.release([slot])


def test_lru_evicts_least_recent() -> None:
    cache = make_cache(2)  # warm start: (0,0) and (1,0)
    cache.begin_step()
    cache.release(cache.ensure(0, [0]))
    cache.begin_step()
    cache.release(cache.ensure(1, [0]))
    cache.begin_step()
    cache.release(cache.ensure(0, [2]))  # evicts (0,0), used before (1,0)
    assert (0, 0) not in cache.slot_of and (1, 0) in cache.slot_of


def test_lfu_keeps_frequent_experts() -> None:
    cache = make_cache(2, "lfu")
    for _ in range(3):
        cache.begin_step()
        cache.release(cache.ensure(0, [0]))
    cache.begin_step()
    cache.release(cache.ensure(1, [0]))
    cache.begin_step()
    cache.release(cache.ensure(1, [3]))  # (1,0) used once, (0,0) three times: (1,0) goes
    assert (0, 0) in cache.slot_of and (1, 0) not in cache.slot_of


def test_pinned_slots_are_never_evicted() -> None:
    cache = make_cache(2)
    pinned = cache.ensure(0, [1, 2])
    with pytest.raises(RuntimeError, match="pinned"):
        cache.ensure(1, [3])
    cache.release(pinned)
    cache.release(cache.ensure(1, [3]))


def test_hits_misses_and_bytes() -> None:
    cache = make_cache(2)
    cache.release(cache.ensure(0, [0, 1]))  # (0,0) warm, (0,1) miss
    cache.release(cache.ensure(0, [0, 1]))  # both hits
    s = cache.stats
    assert (s.hits, s.misses, s.transfers) == (3, 1, 1)
    assert s.transfer_bytes == cache.store.expert_bytes


def test_link_emulation_takes_bytes_over_bandwidth() -> None:
    engine = TransferEngine(CPU, link_gbps=0.02)
    src = torch.randn(500_000)  # 2 MB -> 100 ms at 0.02 GB/s; the copy itself is far shorter
    dst = torch.empty_like(src)
    start = time.perf_counter()
    transfer = engine.submit([(dst, src)], HIGH)
    engine.wait(transfer)
    elapsed = time.perf_counter() - start
    expected = transfer.nbytes / 0.02e9
    assert expected <= transfer.duration_s <= 1.1 * expected
    assert elapsed >= expected and engine.stall_s == pytest.approx(elapsed, rel=0.1)
    assert torch.equal(dst, src)
    engine.close()


def test_a_failed_copy_raises_instead_of_hanging() -> None:
    engine = TransferEngine(CPU)
    transfer = engine.submit([(torch.empty(3), torch.empty(4))], HIGH)  # shapes do not match
    with pytest.raises(RuntimeError, match="expert copy failed"):
        engine.wait(transfer)
    ok = engine.submit([(torch.empty(4), torch.ones(4))], HIGH)  # the link keeps working
    engine.wait(ok)
    engine.close()


def test_host_compute_copies_until_timed_probes_each_token_count_once_then_takes_the_quicker() -> (
    None
):
    host = HostCompute(smoothing=0.5)
    assert not host.prefer_host(1, set())  # no copy timed yet: copy, and learn the link
    host.record_copy(0.010)
    probing: set[int] = set()
    assert host.prefer_host(1, probing)  # one token is untried on the host: probe it once...
    assert not host.prefer_host(1, probing)  # ...in this layer; another miss copies
    assert host.prefer_host(300, probing)  # a prefill's token count is a separate probe
    host.record_host(9.0, 1)  # a first run pays one-time costs: not kept, probed again
    assert host.prefer_host(1, set())
    host.record_host(0.030, 1)
    host.record_host(0.002, 2)  # 2-3 tokens: another estimate, after its own first run
    host.record_host(0.002, 2)
    assert not host.prefer_host(1, set()) and host.prefer_host(3, set())
    assert host.computed == 4
    host.record_copy(0.050)  # the link got slower: 0.010 -> 0.030, level with the host
    assert host.copy_s == pytest.approx(0.030) and not host.prefer_host(1, set())
    host.record_copy(0.050)
    assert host.prefer_host(1, set())


def test_take_host_takes_only_missing_experts_and_copies_one_in_unwaited() -> None:
    host = HostCompute(copy_s=1.0, host_s={1: 0.001}, warmed={1})  # one token: host far quicker
    cache = make_cache(3, host=host)  # warm: (0,0), (1,0), (0,1)
    cache.begin_step()
    slots = cache.ensure(0, [0])  # pinned while its layer runs
    taken = cache.take_host(0, [0, 1, 2, 3], [1, 1, 1, 1])
    assert taken == [2, 3]  # resident ones are not taken
    s = cache.stats
    assert s.host_computes == 2 and s.misses == 2 and s.hits == 1
    # one copy with nobody waiting: the only evictable slot (not pinned, not expert 1 of this
    # layer) went to expert 2; none was left for 3
    assert (0, 2) in cache.slot_of and (0, 3) not in cache.slot_of
    assert cache.slot_of.get((0, 0)) == slots[0] and s.transfers == 1
    assert (0, 2) not in cache.prefetched and s.prefetch_issued == 0
    cache.release(slots)
    assert make_cache(3).take_host(0, [2, 3], [1, 1]) == []  # without a HostCompute: none


def test_a_token_count_the_host_is_slow_at_still_copies() -> None:
    host = HostCompute(copy_s=1.0, host_s={1: 0.001, 9: 5.0})  # 256-511 tokens: slower
    cache = make_cache(3, host=host)
    cache.begin_step()
    assert cache.take_host(0, [2, 3], [300, 1]) == [3]


def test_a_copy_in_flight_is_not_waited_for_when_the_host_is_quicker() -> None:
    host = HostCompute(copy_s=1.0, host_s={1: 0.001})
    cache = make_cache(3, link_gbps=1e-6, host=host)  # a copy would take minutes
    cache.begin_step()
    assert cache.take_host(0, [2], [1]) == [2]  # copied in with nobody waiting, still copying
    start = time.perf_counter()
    assert cache.take_host(0, [2], [1]) == [2]  # not waited for: the host computes it again
    assert cache.take_host(1, [3], [1]) == [3]  # and no second copy queues behind the busy link
    assert time.perf_counter() - start < 1.0 and cache.stats.transfers == 1


def test_a_failed_copy_empties_its_slot_and_fails_loudly(monkeypatch: pytest.MonkeyPatch) -> None:
    """The copy raises on the link's worker (here, a source of the wrong shape): the lookup raises,
    the slot maps nothing (never the stale weights of the expert it held), and the next lookup of
    the expert copies it again."""
    cache = make_cache(2)
    expert = cache.store.expert
    monkeypatch.setattr(
        cache.store,
        "expert",
        lambda layer, e: {n: t.flatten()[:3] for n, t in expert(layer, e).items()},
    )
    with pytest.raises(RuntimeError, match="expert copy failed"):
        slots = cache.ensure(0, [3])
        cache.wait_ready(slots[0])
    assert (0, 3) not in cache.slot_of and not cache.in_flight
    cache.begin_step()  # the failed step's requests are gone: so are its pins
    assert not any(cache.pins)
    monkeypatch.setattr(cache.store, "expert", expert)
    (slot,) = cache.ensure(0, [3])
    cache.wait_ready(slot)
    assert torch.equal(cache.slots.w13[slot], expert(0, 3)["w13"])
    finished = cache.completed[-1]
    assert finished.pairs == [] and finished.then is None  # no buffers kept for its timing


def test_a_failed_copy_nobody_waits_for_is_dropped_quietly(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A prefetch whose copy fails (here, a source of the wrong shape) fails no lookup of other
    experts, not even one whose eviction scan finds its slot: the slot is emptied and reused,
    and a later miss of that expert copies it again."""
    cache = make_cache(3)  # warm: (0,0), (1,0), (0,1)
    expert = cache.store.expert

    def broken(layer: int, e: int) -> dict[str, torch.Tensor]:
        parts = expert(layer, e)
        return {n: t.flatten()[:3] for n, t in parts.items()} if (layer, e) == (1, 3) else parts

    monkeypatch.setattr(cache.store, "expert", broken)
    cache.begin_step()
    assert cache.prefetch(1, [3]) == 1
    failed = cache.in_flight[cache.slot_of[(1, 3)]]
    assert failed.done.wait(5) and failed.error is not None  # failed on the link's worker
    for layer, e in [(1, 1), (1, 2), (0, 3)]:  # misses: each scan passes the failed slot
        (slot,) = cache.ensure(layer, [e])
        assert torch.equal(cache.slots.w13[slot], expert(layer, e)["w13"])
        cache.release([slot])
    assert (1, 3) not in cache.slot_of and "nobody was waiting for failed" in caplog.text
    assert cache.resident_mask(1, 4)[3] is False and cache.outstanding_prefetches() == 0
    monkeypatch.setattr(cache.store, "expert", expert)
    (slot,) = cache.ensure(1, [3])
    assert torch.equal(cache.slots.w13[slot], expert(1, 3)["w13"])


def test_a_prefetch_failing_while_its_layer_waits_is_copied_again(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Still on the link when its layer needs it, then failed: the layer does not fail, the
    expert is copied once more at high priority (a second failure would fail the step)."""
    cache = make_cache(3, link_gbps=2e-6)  # about 0.2 s a copy
    submit = cache.transfers.submit

    def failing_once(pairs: list, priority: int, then: object = None) -> object:
        def fail() -> None:
            raise OSError("out of staging memory")

        return submit(pairs, priority, fail if priority == LOW else then)

    monkeypatch.setattr(cache.transfers, "submit", failing_once)
    cache.begin_step()
    assert cache.prefetch(1, [3]) == 1
    (slot,) = cache.ensure(1, [3])  # waits on the prefetch, which fails, then on its retry
    assert torch.equal(cache.slots.w13[slot], cache.store.expert(1, 3)["w13"])
    assert cache.stats.transfers == 2 and "copying it again" in caplog.text


def test_a_prefetch_failing_while_its_layer_loads_another_expert_is_copied_again(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A layer pins an expert still being prefetched, and that copy fails while the layer's next
    miss scans the slots for a victim: the scan leaves the pinned slot to the layer's wait, which
    copies it again, as when the failure shows in the wait; the layer does not fail."""
    cache = make_cache(3)
    submit, gate = cache.transfers.submit, threading.Event()

    def held_then_failing(pairs: list, priority: int, then: object = None) -> object:
        def fail() -> None:
            gate.wait(5)
            raise OSError("out of staging memory")

        return submit(pairs, priority, fail if priority == LOW else then)

    monkeypatch.setattr(cache.transfers, "submit", held_then_failing)
    cache.begin_step()
    assert cache.prefetch(1, [3]) == 1
    prefetch = cache.in_flight[cache.slot_of[(1, 3)]]
    load = cache._load

    def failing_first(key: tuple[int, int], priority: int, keep: frozenset = frozenset()) -> object:
        gate.set()  # (1, 3) is pinned, not landed: its copy fails before the scan for (1, 2)
        assert prefetch.done.wait(5) and prefetch.error is not None
        return load(key, priority, keep)

    monkeypatch.setattr(cache, "_load", failing_first)
    slots = cache.ensure(1, [3, 2])
    for slot, e in zip(slots, [3, 2], strict=True):
        assert torch.equal(cache.slots.w13[slot], cache.store.expert(1, e)["w13"])
    assert "copying it again" in caplog.text


def test_a_copy_counts_as_done_only_once_the_worker_says_so() -> None:
    """The worker records an error before it sets `done`: a copy whose error is set but not
    yet `done` is still under way (never reported landed), and a done one with an error raises."""
    transfer = Transfer(pairs=[], nbytes=0, priority=HIGH)
    transfer.error = OSError("failed")
    assert transfer.is_done() is False
    transfer.done.set()
    with pytest.raises(RuntimeError, match="expert copy failed"):
        transfer.is_done()


def test_a_closed_link_fails_what_it_had_queued_and_stops_its_thread() -> None:
    transfers = TransferEngine(CPU, link_gbps=5e-6)  # a 1 KiB copy holds the link for 0.2 s
    src, dst = torch.ones(256), torch.zeros(256)
    running = transfers.submit([(dst, src)], LOW)
    while not running.started:
        time.sleep(0.001)
    queued = transfers.submit([(dst, src)], HIGH)
    thread = transfers._link._thread
    transfers.close()  # waits for the running copy, fails the queued one
    with pytest.raises(RuntimeError, match="closed"):
        transfers.wait(queued)
    assert not thread.is_alive()
    late = transfers.submit([(dst, src)], LOW)
    assert late.done.is_set() and late.error is not None  # after close: failed, not lost


def test_an_engine_nobody_holds_stops_its_link_thread() -> None:
    transfers = TransferEngine(CPU)
    thread, alive = transfers._link._thread, weakref.ref(transfers)
    del transfers
    gc.collect()
    assert alive() is None
    thread.join(timeout=5)
    assert not thread.is_alive()


def test_a_miss_does_not_evict_an_expert_its_own_layer_call_needs_next() -> None:
    """LRU's victim is often the layer's own expert from the step before: loading a missing
    expert must not evict a resident one the same call looks up next (two misses for one)."""
    cache = make_cache(2)
    cache.begin_step()
    cache.release(cache.ensure(0, [3]))  # (0, 3) is now the least recently used
    cache.release(cache.ensure(1, [1]))
    cache.begin_step()
    misses = cache.stats.misses
    cache.release(cache.ensure(0, [2, 3]))
    assert cache.stats.misses - misses == 1
    assert sorted(k for k in cache.key_of if k is not None) == [(0, 2), (0, 3)]


def test_a_miss_waiting_for_a_prefetch_slot_does_not_evict_an_expert_its_call_needs() -> None:
    """Every slot is being written by a prefetch, one of them an expert this call needs next: the
    miss must wait for the other prefetch's slot, not evict the one it is about to look up (which
    would make a landed prefetch a second miss and copy it again)."""
    cache = make_cache(2, link_gbps=4e-6)  # about 0.1 s a copy
    cache.begin_step()
    assert cache.prefetch(0, [1]) == 1  # first on the link
    assert cache.prefetch(1, [2]) == 1  # both slots now being written
    cache.begin_step()
    misses, transfers = cache.stats.misses, cache.stats.transfers
    cache.release(cache.ensure(0, [0, 1]))  # (0, 0) misses; (0, 1) has landed by its turn
    assert (cache.stats.misses - misses, cache.stats.transfers - transfers) == (1, 1)
    assert sorted(k for k in cache.key_of if k is not None) == [(0, 0), (0, 1)]
