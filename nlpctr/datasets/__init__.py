"""The bundled datasets: real public logs shipped inside the package (see README.md here).

They install with the package (editable or wheel), so `nlpctr data prepare --dataset upworthy`
works from any folder with nothing beside the project.
"""

from pathlib import Path

BUNDLED_DATA_DIR = Path(__file__).resolve().parent
