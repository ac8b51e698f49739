import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# platform/ is a source root (see manage.py); its apps import as top-level modules.
sys.path.append(str(REPO / "platform"))
