"""`gistctl bench --protocol seed`: the study's evaluation set and its success criteria.

Data: the passkey builder's `seed` protocol (6-character [A-Z0-9] key in prose, 2k-8k tokens) plus an
aggregate set over the same lengths (questions about items spread through the whole text, which no single
chunk answers: the "global-theme" tasks). Criteria, from the measured metrics of one gist column vs `rag`:
gist peak memory <= RAG's; gist TTFT at least 30% below RAG's; gist passkey >= 70%; "global theme at least 20
points above RAG (>= 80%)": gist aggregate accuracy at least 20 points above RAG's and at least 80%, both halves.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

SEED_METHODS = "gist,rag,full"
SEED_LENGTHS = "2k..8k"
DEFAULT_N = 20  # examples per set (passkey, aggregate) when --limit is not given
TTFT_SPEEDUP = 0.30
PASSKEY_MIN = 0.70
AGGREGATE_MARGIN = 0.20
AGGREGATE_MIN = 0.80
_EPS = 1e-9  # exact-threshold results (e.g. 0.9 - 0.7) must not fail on float rounding


@dataclass
class Criterion:
    name: str
    target: str
    measured: str
    passed: bool | None  # None: a number it needs was not measured

    @property
    def verdict(self) -> str:
        return {True: "PASS", False: "FAIL", None: "n/a"}[self.passed]

    def as_dict(self) -> dict:
        return {**asdict(self), "verdict": self.verdict}


def build_seed_records(tokenizer, n: int, seed: int) -> list[dict]:
    """n seed-protocol passkey examples + n aggregate examples, 2k-8k tokens, measured with `tokenizer`."""
    from gistctl.data.builders import build_aggregate, build_passkey
    from gistctl.data.lengths import parse_lengths

    lengths = parse_lengths(SEED_LENGTHS)
    return (list(build_passkey(tokenizer, n=n, seed=seed, tokens=lengths, protocol="seed"))
            + list(build_aggregate(tokenizer, n=n, seed=seed, tokens=lengths)))


def _task_mean(m: dict | None, task: str) -> float | None:
    return ((m or {}).get("tasks", {}).get(task) or {}).get("mean")


def seed_criteria(methods: dict[str, dict], gist: str, rag: str = "rag") -> list[Criterion]:
    """Pass/fail of the four criteria for column `gist` against column `rag`, from metrics.json's `methods`."""
    g, r = methods.get(gist), methods.get(rag)
    out = []

    gm, rm = (g or {}).get("peak_memory_bytes"), (r or {}).get("peak_memory_bytes")
    out.append(Criterion(
        f"{gist} peak memory <= {rag}", "gist <= rag",
        "-" if gm is None or rm is None else f"{gm / 2**20:.1f} MiB vs {rm / 2**20:.1f} MiB",
        None if gm is None or rm is None else gm <= rm))

    gt, rt = (g or {}).get("ttft_ms"), (r or {}).get("ttft_ms")
    speedup = None if gt is None or not rt else 1 - gt / rt
    out.append(Criterion(
        f"{gist} TTFT >= {TTFT_SPEEDUP:.0%} faster than {rag}", f"speedup >= {TTFT_SPEEDUP:.0%}",
        "-" if speedup is None else f"{gt:.1f} ms vs {rt:.1f} ms ({speedup:+.0%})",
        None if speedup is None else speedup >= TTFT_SPEEDUP - _EPS))

    passkey = _task_mean(g, "passkey")
    out.append(Criterion(
        f"{gist} passkey >= {PASSKEY_MIN:.0%}", f">= {PASSKEY_MIN:.0%}",
        "-" if passkey is None else f"{passkey:.0%}",
        None if passkey is None else passkey >= PASSKEY_MIN - _EPS))

    ga, ra = _task_mean(g, "aggregate"), _task_mean(r, "aggregate")
    margin = None if ga is None or ra is None else ga - ra
    out.append(Criterion(
        f"{gist} global-theme (aggregate) >= {rag} + {AGGREGATE_MARGIN * 100:.0f} points and >= {AGGREGATE_MIN:.0%}",
        f"+{AGGREGATE_MARGIN * 100:.0f} points, >= {AGGREGATE_MIN:.0%}",
        "-" if margin is None else f"{ga:.0%} vs {ra:.0%} ({margin * 100:+.0f} points)",
        None if margin is None else (margin >= AGGREGATE_MARGIN - _EPS and ga >= AGGREGATE_MIN - _EPS)))
    return out
