"""The README documents every environment variable exactly as pacekern/env.py declares it."""
from pathlib import Path

from pacekern.env import markdown_table


def test_readme_env_table_is_generated_from_env_py():
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    assert markdown_table() in readme, "regenerate the table with: ./run python -m pacekern.env"
