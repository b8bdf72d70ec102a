"""`pacekern -h` and every subcommand's -h print their help (argparse expands '%' in help strings,
so a stray one breaks the whole help page)."""
import pytest

from pacekern.cli import main

SUBCOMMANDS = ["demo", "generate", "bench", "tune", "check", "show", "cache", "models", "env", "dlrm"]


@pytest.mark.parametrize("argv", [["-h"]] + [[s, "-h"] for s in SUBCOMMANDS])
def test_help_pages_print(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0
    assert "usage:" in capsys.readouterr().out
