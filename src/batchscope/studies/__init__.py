"""One module per paper: the sweeps it needs and the analysis that turns stored runs into claims."""

from .base import Analysis, Options, Study
from .breakeven import Breakeven
from .hoffer import Hoffer
from .kaur import Kaur
from .keskar import Keskar
from .lili import LiLi

STUDIES: dict[str, type[Study]] = {s.name: s for s in (Keskar, Hoffer, Breakeven, LiLi, Kaur)}

__all__ = ["STUDIES", "Analysis", "Options", "Study"]
