"""Claims of a paper with the verdicts computed for them, and their claims.json."""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import batchscope

from ..stats import OUTCOMES, RegimeCheck, Verdict, gate, jsonable

SCHEMA = 2  # 2: regime checks, magnitudes beside the paper's, the project's own claims, `untested`
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


@dataclass
class Magnitude:
    """How strong the effect is, measured beside the paper's published number.

    `measured` is the study's estimate (with `ci` where there is one) in the same units as
    `published`, which is a number, a (low, high) range, or None where the paper gives none;
    `source` says where the published number comes from (table, figure, setting).
    """

    quantity: str
    measured: float | None
    published: float | tuple[float, float] | None = None
    source: str = ""
    ci: tuple[float | None, float | None] | None = None

    def to_dict(self) -> dict[str, Any]:
        return jsonable({"quantity": self.quantity, "measured": self.measured, "ci": self.ci,
                         "published": self.published, "source": self.source})

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Magnitude:
        pub = d.get("published")
        ci = d.get("ci")
        return cls(d["quantity"], d.get("measured"), tuple(pub) if isinstance(pub, list) else pub, d.get("source", ""),
                   tuple(ci) if ci else None)


@dataclass
class Claim:
    """One claim: its statement, the verdict computed from the data, the numbers measured, the regime checks
    under which it can be tested, and its effect's size beside the paper's.

    `own` marks a claim the project adds (a consequence or a precondition it tests), not one the paper
    makes. A failed regime check turns the verdict into `untested` here, in one place for every study.
    """

    id: str
    statement: str
    verdict: Verdict
    measured: dict[str, Any] = field(default_factory=dict)
    figure: str | None = None
    regime: list[RegimeCheck] = field(default_factory=list)
    magnitude: list[Magnitude] = field(default_factory=list)
    own: bool = False

    def __post_init__(self) -> None:
        # A verdict is only ever the output of batchscope.stats: no hand-written strings.
        if not isinstance(self.verdict, Verdict):
            kind = type(self.verdict).__name__
            raise TypeError(f"claim {self.id!r}: verdict must be a batchscope.stats.Verdict, got {kind}")
        if not _ID.match(self.id):
            raise ValueError(f"claim id {self.id!r}: use letters, digits, '_', '-', '.'")
        if isinstance(self.magnitude, Magnitude):
            self.magnitude = [self.magnitude]
        self.verdict = gate(self.verdict, self.regime)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (NaN becomes None)."""
        return jsonable(
            {"id": self.id, "statement": self.statement, "own": self.own, "verdict": self.verdict.to_dict(),
             "regime": [r.to_dict() for r in self.regime], "magnitude": [m.to_dict() for m in self.magnitude],
             "measured": self.measured, "figure": self.figure}
        )

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Claim:
        """Inverse of `to_dict`."""
        return cls(d["id"], d["statement"], Verdict.from_dict(d["verdict"]), dict(d.get("measured") or {}),
                   d.get("figure"), [RegimeCheck.from_dict(r) for r in d.get("regime") or []],
                   [Magnitude.from_dict(m) for m in d.get("magnitude") or []], bool(d.get("own", False)))


def now_utc() -> str:
    """The current UTC time, ISO 8601 to the second."""
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def claims_document(claims: Sequence[Claim], meta: Mapping[str, Any]) -> dict[str, Any]:
    """The claims.json content: study, scale, created, version, verdict counts, meta, and every claim."""
    missing = [k for k in ("study", "scale") if k not in meta]
    if missing:
        raise ValueError(f"meta needs {', '.join(missing)}")
    ids = [c.id for c in claims]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise ValueError(f"duplicate claim ids: {', '.join(dup)}")
    rest = {k: v for k, v in meta.items() if k not in ("study", "scale", "created")}
    return jsonable(
        {
            "schema": SCHEMA,
            "study": meta["study"],
            "scale": meta["scale"],
            "created": meta.get("created") or now_utc(),
            "batchscope_version": batchscope.__version__,
            "counts": {o: sum(c.verdict.verdict == o for c in claims) for o in OUTCOMES},
            "regime": _regime_checks(claims),
            "meta": rest,
            "claims": [c.to_dict() for c in claims],
        }
    )


def _regime_checks(claims: Sequence[Claim]) -> list[dict[str, Any]]:
    """Every distinct regime check of the study, with the claims that depend on it."""
    out: dict[str, dict[str, Any]] = {}
    for c in claims:
        for r in c.regime:
            entry = out.setdefault(r.id, {**r.to_dict(), "claims": []})
            entry["claims"].append(c.id)
    return list(out.values())


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` via a temporary file and rename, so no reader sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_claims(path: str | Path, claims: Sequence[Claim], meta: Mapping[str, Any]) -> Path:
    """Write claims.json (meta must name `study` and `scale`; `created` is filled in if absent)."""
    path = Path(path)
    doc = claims_document(claims, meta)
    # allow_nan=False: a NaN that slipped past jsonable is a bug, not a number
    write_text_atomic(path, json.dumps(doc, indent=2, allow_nan=False) + "\n")
    return path


def read_claims(path: str | Path) -> tuple[dict[str, Any], list[Claim]]:
    """(document without its claims, the claims) read back from claims.json."""
    doc = json.loads(Path(path).read_text(encoding="utf-8"))
    claims = [Claim.from_dict(c) for c in doc.pop("claims")]
    return doc, claims
