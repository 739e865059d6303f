"""One module per paper: the sweeps it needs and the analysis that turns stored runs into claims."""

from .base import Analysis, Options, Study
from .hoffer import Hoffer
from .keskar import Keskar

STUDIES: dict[str, type[Study]] = {s.name: s for s in (Keskar, Hoffer)}

__all__ = ["STUDIES", "Analysis", "Options", "Study"]
