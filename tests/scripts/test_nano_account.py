"""scripts/nano_account.py's verdict on a cold first run: the first nano run in a process against the second,
with the issue's 5 % tolerance (the runs themselves need a GPU)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))

from nano_account import first_against_second


def test_a_first_run_within_five_percent_of_the_second_passes():
    ok = first_against_second(7.30, 7.00)
    assert ok["within"] and abs(ok["excess"] - 0.3 / 7) < 1e-12
    assert "+4.3% (within 5%)" in ok["line"]


def test_a_cold_first_run_is_called_out():
    cold = first_against_second(8.956, 7.168)
    assert not cold["within"] and "+24.9% (NOT within 5%)" in cold["line"]
