"""A lower bound on stall that no policy or predictor can beat: the link's capacity.

Belady bounds misses, but a prefetching system can have misses and no stall, or few misses and
much stall; the stall target needs its own reference. Over any window of layer calls a..b, the
keys it uses that are not in a slot when call a starts must be copied before call b's experts
run. At most `capacity` keys are in slots then (a key being copied already holds its slot), so at
least |keys(a..b)| - capacity whole copies start inside the window. The link cannot copy for
longer than the window lasts, which is its compute plus its stall:

    stall(a..b) >= (|keys(a..b)| - capacity) * copy_s - compute(a..b)

Disjoint windows add up; the best partition of the run is found by dynamic programming. It holds
for every policy and predictor, resident-first included, given the compute times (a run's own, or
the all-resident run's for a system with no host overhead), on a link that copies one expert at a
time in `copy_s` or more. It does not hold for a system that computes missing experts on the host.
"""

from __future__ import annotations

Key = tuple[int, int]


def stall_lower_bound(
    lookups: list[tuple[int, list[int]]], compute_s: list[float], capacity: int, copy_s: float
) -> float:
    """lookups: (layer, distinct experts) per layer call, in order; compute_s: each call's compute
    seconds up to the next call (stall excluded)."""
    if len(compute_s) != len(lookups):
        raise ValueError(f"{len(compute_s)} compute times for {len(lookups)} layer calls")
    # no window holds more keys than the run: once its compute hides them all, longer ones end
    most = (len({(layer, e) for layer, experts in lookups for e in experts}) - capacity) * copy_s
    best = [0.0] * (len(lookups) + 1)  # best[j]: the bound over calls 0..j-1
    for end in range(1, len(lookups) + 1):
        best[end] = best[end - 1]
        keys: set[Key] = set()
        compute = 0.0
        for start in range(end - 1, -1, -1):
            layer, experts = lookups[start]
            keys.update((layer, e) for e in experts)
            compute += compute_s[start]
            if compute >= most:
                break
            bound = (len(keys) - capacity) * copy_s - compute
            if bound > 0 and best[start] + bound > best[end]:
                best[end] = best[start] + bound
    return best[-1]


def stall_lower_bound_of(
    lookups: list[tuple[int, list[int]]],
    compute_s: list[float],
    counted: list[bool],
    capacity: int,
    copy_s: float,
) -> float:
    """The bound on the stall of the `counted` calls alone (decode steps, say): windows run over
    consecutive counted calls only, each run bounded on its own."""
    total, start = 0.0, None
    for i, keep in enumerate([*counted, False]):
        if keep and start is None:
            start = i
        elif not keep and start is not None:
            total += stall_lower_bound(lookups[start:i], compute_s[start:i], capacity, copy_s)
            start = None
    return total
