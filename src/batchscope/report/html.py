"""The report page: one self-contained index.html (inline CSS, figures as data URIs, no scripts, no links out)."""

from __future__ import annotations

import base64
import json
import math
import re
import shutil
from collections.abc import Mapping, Sequence
from html import escape
from pathlib import Path
from typing import Any

import batchscope

from ..stats import OUTCOMES, Summary, jsonable
from .claims import Claim, Magnitude, claims_document, now_utc, write_claims, write_text_atomic

_PNG = b"\x89PNG\r\n\x1a\n"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
_MAX_LIST = 12  # longer lists are cut in the page; claims.json keeps every number

Figure = tuple[str, "str | Path", str]  # (name, png path, caption)
Table = tuple[str, Sequence[str], Sequence[Sequence[Any]]]  # (caption, header, rows)

_CSS = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1f2328;margin:0;background:#fff}
main{max-width:1100px;margin:0 auto;padding:24px}
h1{font-size:1.6em;margin:0 0 4px} h2{font-size:1.2em;margin:28px 0 8px;border-bottom:1px solid #d0d7de;padding-bottom:4px}
.sub{color:#59636e;margin:0 0 12px}
table{border-collapse:collapse;width:100%;font-size:.9em}
th,td{border:1px solid #d0d7de;padding:6px 8px;vertical-align:top;text-align:left}
th{background:#f6f8fa}
.badge{display:inline-block;padding:1px 8px;border-radius:10px;color:#fff;font-weight:600;font-size:.85em;white-space:nowrap}
.holds{background:#1a7f37}.fails{background:#cf222e}.inconclusive{background:#6e7781}.untested{background:#9a6700}
.pass{color:#1a7f37;font-weight:600}.nopass{color:#cf222e;font-weight:600}
.own{display:inline-block;font-size:.78em;border:1px solid #8c959f;border-radius:8px;padding:0 6px;color:#59636e}
.rule{color:#59636e;font-size:.88em;margin-top:4px}
.num{font-family:ui-monospace,SFMono-Regular,Menlo,monospace;font-size:.88em}
ul.kv{list-style:none;margin:0;padding:0} ul.kv li{margin:0 0 2px}
figure{margin:16px 0;display:inline-block;max-width:100%;vertical-align:top}
figure img{max-width:100%;height:auto;border:1px solid #d0d7de}
figcaption{font-size:.88em;color:#59636e;max-width:640px}
footer{margin-top:32px;font-size:.85em;color:#59636e;border-top:1px solid #d0d7de;padding-top:8px}
footer dl{display:grid;grid-template-columns:max-content 1fr;gap:2px 12px;margin:0} footer dt{font-weight:600}
"""


def _num(x: Any) -> str:
    """A number as text: 4 significant digits, '—' for missing."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "—"
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, int):
        return str(x)
    if isinstance(x, float):
        return f"{x:.4g}"
    return escape(str(x))


def _value(v: Any) -> str:
    """HTML for a measured value: mean ± sd (n) for summaries, lists cut short, nested dicts as lists."""
    if isinstance(v, Summary) or hasattr(v, "to_dict"):
        v = jsonable(v)
    if isinstance(v, Mapping) and {"mean", "std", "n"} <= set(v) and not isinstance(v["mean"], list):
        return f'<span class="num">{_num(v["mean"])} ± {_num(v["std"])}</span> (n={_num(v["n"])})'
    if isinstance(v, Mapping):
        return _kv(v)
    if isinstance(v, (list, tuple)) or (hasattr(v, "tolist") and not isinstance(v, (str, bytes))):
        items = jsonable(v)
        if not isinstance(items, list):
            return _num(items)
        shown = ", ".join(_value(i) for i in items[:_MAX_LIST])
        more = f", … ({len(items)} in all)" if len(items) > _MAX_LIST else ""
        return f'<span class="num">[{shown}{more}]</span>'
    return _num(jsonable(v))


def _kv(d: Mapping[str, Any]) -> str:
    if not d:
        return "—"
    return '<ul class="kv">' + "".join(f"<li>{escape(str(k))}: {_value(v)}</li>" for k, v in d.items()) + "</ul>"


def _badge(outcome: str) -> str:
    cls = outcome if outcome in OUTCOMES else "inconclusive"
    return f'<span class="badge {cls}">{escape(outcome)}</span>'


def _claim_row(c: Claim, figure_ids: set[str]) -> str:
    v = c.verdict
    lo, hi = v.ci
    est = "" if v.estimate is None and lo is None else (
        f'<div class="num">estimate {_num(v.estimate)}, CI [{_num(lo)}, {_num(hi)}]</div>'
    )
    parts = v.details.get("parts") if isinstance(v.details, Mapping) else None
    part_html = ""
    if isinstance(parts, Mapping):
        part_html = '<ul class="kv">' + "".join(
            f"<li>{escape(str(k))}: {_badge(p.get('verdict', '?'))} <span class='num'>{_num(p.get('estimate'))} "
            f"[{_num((p.get('ci') or [None, None])[0])}, {_num((p.get('ci') or [None, None])[1])}]</span></li>"
            for k, p in parts.items()
        ) + "</ul>"
    fig = f'<a href="#fig-{escape(c.figure)}">{escape(c.figure)}</a>' if c.figure in figure_ids else "—"
    own = ' <span class="own" title="not a claim of the paper">project\'s own</span>' if c.own else ""
    why = ""
    if v.verdict == "untested":
        reasons = v.details.get("untested_because") or []
        why = ('<div class="rule">untested: the run was not in the regime the claim needs ('
               + escape("; ".join(map(str, reasons)))
               + f'); the data alone would say {escape(str(v.details.get("verdict_if_tested")))}</div>')
    excl = v.details.get("excluded_reasons") if isinstance(v.details, Mapping) else None
    excl_txt = f" ({escape(', '.join(f'{k}: {n}' for k, n in excl.items()))})" if excl else ""
    return (
        f"<tr id=\"claim-{escape(c.id)}\"><td><strong>{escape(c.id)}</strong>{own}<br>{escape(c.statement)}</td>"
        f"<td>{_badge(v.verdict)}{est}<div>n = {v.n}, excluded {v.n_excluded}{excl_txt}</div>{why}{part_html}"
        f'<div class="rule">{escape(v.test)}: {escape(v.rule)}</div></td>'
        f"<td>{_magnitudes(c.magnitude)}</td><td>{_kv(c.measured)}</td><td>{fig}</td></tr>"
    )


def _magnitudes(ms: Sequence[Magnitude]) -> str:
    """Measured effect sizes beside the published ones."""
    if not ms:
        return "—"
    rows = []
    for m in ms:
        ci = f" [{_num(m.ci[0])}, {_num(m.ci[1])}]" if m.ci else ""
        pub = m.published
        pub_txt = "not published" if pub is None else (
            f"{_num(pub[0])} to {_num(pub[1])}" if isinstance(pub, (tuple, list)) else _num(pub))
        src = f" ({escape(m.source)})" if m.source else ""
        rows.append(f"<li>{escape(m.quantity)}: measured <span class='num'>{_num(m.measured)}{ci}</span>; "
                    f"paper <span class='num'>{pub_txt}</span>{src}</li>")
    return '<ul class="kv">' + "".join(rows) + "</ul>"


def _regime_html(doc: Mapping[str, Any]) -> str:
    """The regime checks, before any verdict: what had to be true for the paper's claims to be testable."""
    checks = doc.get("regime") or []
    if not checks:
        return ""
    rows = "".join(
        f"<tr id=\"regime-{escape(str(r['id']))}\"><td><strong>{escape(str(r['id']))}</strong></td>"
        f"<td>{escape(str(r['condition']))}</td>"
        f"<td>{_kv(r.get('measured') or {})}</td>"
        f"<td class=\"{'pass' if r['passed'] else 'nopass'}\">{'passed' if r['passed'] else 'not reached'}</td>"
        f"<td>{escape(', '.join(r['claims']))}</td></tr>"
        for r in checks
    )
    n_ok = sum(1 for r in checks if r["passed"])
    return (f"<section id=\"regime\"><h2>Regime checks ({n_ok} of {len(checks)} passed)</h2>"
            "<p class=\"rule\">Each claim of a paper can be tested only where the runs are in the regime the paper "
            "describes. These conditions are measured first; a claim whose check is not reached is <em>untested</em>, "
            "never <em>fails</em>.</p><table><thead><tr><th>check</th><th>condition</th><th>measured</th><th>result</th>"
            f"<th>claims</th></tr></thead><tbody>{rows}</tbody></table></section>")


def _paragraphs(text: str | Sequence[str]) -> str:
    paras = re.split(r"\n\s*\n", text) if isinstance(text, str) else list(text)
    return "".join(f"<p>{escape(p.strip())}</p>" for p in paras if p.strip())


def _figure_html(name: str, png: bytes, caption: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return (
        f'<figure id="fig-{escape(name)}"><img src="data:image/png;base64,{data}" alt="{escape(caption)}">'
        f"<figcaption><strong>{escape(name)}</strong>: {escape(caption)}</figcaption></figure>"
    )


def _table_html(caption: str, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    for i, row in enumerate(rows):
        if len(row) != len(header):
            raise ValueError(f"table {caption!r}: row {i} has {len(row)} cells, the header {len(header)}")
    head = "".join(f"<th>{escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_value(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<h3>{escape(caption)}</h3><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _footer(doc: Mapping[str, Any]) -> str:
    items = {
        "study": doc["study"], "scale": doc["scale"], "created": doc["created"],
        "batchscope": doc["batchscope_version"], **doc["meta"],
    }
    rows = "".join(
        f"<dt>{escape(str(k))}</dt><dd>{escape(v if isinstance(v, str) else json.dumps(v))}</dd>" for k, v in items.items()
    )
    return f"<footer><h2>Provenance</h2><dl>{rows}</dl></footer>"


def _read_figures(figures: Sequence[Figure]) -> list[tuple[str, Path, bytes, str]]:
    """Check names and files and read each PNG: (name, source path, bytes, caption)."""
    read, seen = [], set()
    for name, path, caption in figures:
        if not _NAME.match(name) or name in seen:
            raise ValueError(f"figure name {name!r}: must be unique and use letters, digits, '_', '-', '.'")
        seen.add(name)
        src = Path(path)
        if not src.is_file():
            raise ValueError(f"figure {name!r}: no file at {src}")
        png = src.read_bytes()
        if not png.startswith(_PNG):
            raise ValueError(f"figure {name!r}: {src} is not a PNG")
        read.append((name, src, png, caption))
    return read


def write_report(
    out_dir: str | Path,
    *,
    title: str,
    summary: str | Sequence[str],
    claims: Sequence[Claim],
    figures: Sequence[Figure] = (),
    tables: Sequence[Table] = (),
    meta: Mapping[str, Any],
) -> Path:
    """Write out_dir/index.html, out_dir/claims.json and out_dir/figures/*.png; return the index path.

    `summary` is plain text (blank lines separate paragraphs) or a list of paragraphs; all text is
    escaped. `meta` must name `study` and `scale`; seeds, data and anything else go to the footer.
    """
    out = Path(out_dir)
    meta = {**meta, "created": meta.get("created") or now_utc()}
    doc = claims_document(claims, meta)  # validates meta and claim ids before anything is written
    figs = _read_figures(figures)
    names = {n for n, _, _, _ in figs}
    for c in claims:
        if c.figure is not None and c.figure not in names:
            raise ValueError(f"claim {c.id!r} refers to figure {c.figure!r}, which is not among the figures")
    staged = [(name, png, caption) for name, _, png, caption in figs]
    counts = " ".join(f"{_badge(o)} {doc['counts'][o]}" for o in OUTCOMES)
    claim_rows = "".join(_claim_row(c, names) for c in claims)
    sub = " · ".join(
        [f"study {doc['study']}", f"scale {doc['scale']}", str(doc["created"]), f"batchscope {batchscope.__version__}"]
    )
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">
<title>{escape(title)}</title><style>{_CSS}</style></head>
<body><main>
<h1>{escape(title)}</h1>
<p class="sub">{escape(sub)}</p>
<p>{counts}</p>
{_regime_html(doc)}
<section><h2>Summary</h2>{_paragraphs(summary)}
<p class="rule">Every verdict is computed from the stored runs by batchscope.stats: <em>holds</em> only when the
whole confidence interval lies on the claimed side (or inside the stated margin for "no difference" claims),
<em>fails</em> when it lies wholly on the other side (or short of the minimal effect stated in advance), <em>inconclusive</em>
otherwise or with too few valid runs, and <em>untested</em> when a regime check above was not reached. Runs left out
(diverged, failed, missed the fitting criterion) are counted with their reason. Claims marked \
<span class="own">project's own</span>
are consequences or preconditions the project tests, not claims of the paper. The rule is shown beside each verdict.</p></section>
<section><h2>Claims</h2><table><thead><tr><th>claim</th><th>verdict and rule</th>\
<th>effect: measured and published</th><th>measured</th><th>figure</th></tr></thead>
<tbody>{claim_rows}</tbody></table></section>
{"<section><h2>Figures</h2>" + "".join(_figure_html(*f) for f in staged) + "</section>" if staged else ""}
{"<section><h2>Tables</h2>" + "".join(_table_html(*t) for t in tables) + "</section>" if tables else ""}
{_footer(doc)}
</main></body></html>
"""
    # Everything is checked and the page is built: only now write.
    return _write(out, figs, page, lambda: write_claims(out / "claims.json", claims, meta))


def _write(out: Path, figs: Sequence[tuple[str, Path, bytes, str]], page: str, beside: Any = None) -> Path:
    """figures/ (each PNG the page embeds), whatever `beside()` writes next to the page, then index.html."""
    fig_dir = out / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    for name, src, _, _ in figs:
        dst = fig_dir / f"{name}.png"
        if not (dst.exists() and dst.resolve() == src.resolve()):
            shutil.copyfile(src, dst)
    if beside is not None:
        beside()
    index = out / "index.html"
    write_text_atomic(index, page)
    return index


def write_page(
    out_dir: str | Path,
    *,
    title: str,
    subtitle: str,
    sections: Sequence[tuple[str, str | Sequence[str]]],
    figures: Sequence[Figure] = (),
    tables: Sequence[Table] = (),
    document: tuple[str, Mapping[str, Any]] | None = None,
) -> Path:
    """A report page without claims (batch-size advice): sections of text, figures, tables, and a JSON document
    (name, content) written beside it. The same self-contained page as `write_report`; returns the index path."""
    out = Path(out_dir)
    figs = _read_figures(figures)
    body = "".join(f"<section><h2>{escape(h)}</h2>{_paragraphs(t)}</section>" for h, t in sections)
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">
<title>{escape(title)}</title><style>{_CSS}</style></head>
<body><main>
<h1>{escape(title)}</h1>
<p class="sub">{escape(subtitle)} · {escape(now_utc())} · batchscope {escape(batchscope.__version__)}</p>
{body}
{"<section><h2>Figures</h2>" + "".join(_figure_html(n, png, cap) for n, _, png, cap in figs) + "</section>" if figs else ""}
{"<section><h2>Tables</h2>" + "".join(_table_html(*t) for t in tables) + "</section>" if tables else ""}
</main></body></html>
"""
    return _write(out, figs, page, None if document is None else lambda: write_text_atomic(
        out / document[0], json.dumps(jsonable(document[1]), indent=1, sort_keys=True)))
