"""Expanded IN lists come in few lengths, so PostgreSQL settles on generic plans for each (``bulk.plan_sized``)."""

from __future__ import annotations

from loyalty.db.bulk import PLAN_SIZED_UP_TO, plan_sized


def test_a_list_is_padded_with_its_last_value_to_the_next_power_of_two() -> None:
    assert plan_sized([]) == []
    assert plan_sized([7]) == [7]
    assert plan_sized([3, 5]) == [3, 5]
    assert plan_sized([3, 5, 9]) == [3, 5, 9, 9]
    assert plan_sized(range(5)) == [0, 1, 2, 3, 4, 4, 4, 4]


def test_lengths_up_to_the_bound_take_a_few_shapes_and_keep_their_values() -> None:
    shapes = set()
    for length in range(1, PLAN_SIZED_UP_TO + 1):
        values = list(range(100, 100 + length))
        padded = plan_sized(values)
        assert padded[:length] == values
        assert set(padded) == set(values)
        shapes.add(len(padded))
    assert shapes == {2**power for power in range(11)}


def test_longer_lists_stay_as_they_are() -> None:
    values = list(range(PLAN_SIZED_UP_TO + 1))
    assert plan_sized(values) == values
