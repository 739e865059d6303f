"""A study's report: claims.json with computed verdicts, PNG figures, and one self-contained HTML page."""

from .claims import Claim, Magnitude, read_claims, write_claims
from .figures import errorbar_points, line_with_band, log_ticks, new_figure, plain_log, save
from .html import write_page, write_report

__all__ = [
    "Claim",
    "Magnitude",
    "errorbar_points",
    "line_with_band",
    "log_ticks",
    "plain_log",
    "new_figure",
    "read_claims",
    "save",
    "write_claims",
    "write_page",
    "write_report",
]
