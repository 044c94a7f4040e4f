"""Random draws used by the shape models: lengths, popularity, arrivals."""
import bisect
import itertools
import math


def lognormal_tokens(rng, median, sigma, low=1, high=131072):
    """A length in tokens, lognormal around `median`, clamped to [low, high]
    (131,072: the 128k context the Mooncake paper's service runs)."""
    return max(low, min(high, int(round(median * math.exp(rng.gauss(0.0, sigma))))))


class Zipf:
    """Item i in [0, n) with probability proportional to 1 / (i + 1)^s."""

    def __init__(self, n, s):
        self.cumulative = list(itertools.accumulate((i + 1) ** -s for i in range(n)))

    def draw(self, rng):
        x = rng.random() * self.cumulative[-1]
        return min(bisect.bisect_right(self.cumulative, x), len(self.cumulative) - 1)

    def draw_distinct(self, rng, k):
        picked = []
        while len(picked) < min(k, len(self.cumulative)):
            i = self.draw(rng)
            if i not in picked:
                picked.append(i)
        return picked


def bursty_poisson(rng, rate_per_s, start_s, end_s, burst_factor=4.0,
                   calm_mean_s=240.0, burst_mean_s=30.0):
    """Arrival times of a two-state Markov-modulated Poisson process: calm
    periods at `rate_per_s` and bursts at `burst_factor` times it, with
    exponentially distributed durations. The mean rate is kept at
    `rate_per_s` by scaling both states."""
    share_burst = burst_mean_s / (calm_mean_s + burst_mean_s)
    calm_rate = rate_per_s / (1.0 - share_burst + share_burst * burst_factor)
    times, t, burst = [], start_s, False
    while t < end_s:
        period_end = min(end_s, t + rng.expovariate(1.0 / (burst_mean_s if burst else calm_mean_s)))
        rate = calm_rate * (burst_factor if burst else 1.0)
        t = t + rng.expovariate(rate)
        while t < period_end:
            times.append(t)
            t += rng.expovariate(rate)
        t, burst = period_end, not burst
    return times
