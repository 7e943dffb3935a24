"""delays=a/b/c/d as Postfix writes it: its parts add up to delay=, each with two significant
digits, none finer than 10 ms, whole seconds from 10 s on."""

from __future__ import annotations

import time

import pytest

from router.logs.lines import Delays


@pytest.mark.parametrize(("parts", "text"), [
    ((0.0, 0.0, 0.0, 0.0), "0/0/0/0"),
    ((0.004, 0.0123, 0.456, 1.234), "0/0.01/0.46/1.2"),
    ((9.996, 12.4, 172800.3, 0.05), "10/12/172800/0.05"),
])
def test_each_part_is_written_as_postfix_writes_it(parts, text):
    assert str(Delays(sum(parts), *parts)) == text


def test_the_parts_add_up_to_the_delay_and_none_is_negative():
    now = time.time()
    delays = Delays.measure(arrival=now - 100, taken=now - 40, setup=5, transmission=3)
    assert delays.before == pytest.approx(60, abs=0.5) and (delays.setup, delays.transmission) == (5, 3)
    assert delays.before + delays.queue + delays.setup + delays.transmission == pytest.approx(delays.total)
    never_taken = Delays.measure(arrival=now - 100, taken=0.0)
    assert never_taken.before == never_taken.total and never_taken.queue == 0
    # a transport's own clock may say more than the whole delay: the parts are cut to fit it
    late = Delays.measure(arrival=now - 1, taken=now - 0.5, setup=2, transmission=2)
    assert min(late.before, late.queue, late.setup, late.transmission) >= 0
    assert late.before + late.queue + late.setup + late.transmission == pytest.approx(late.total)
