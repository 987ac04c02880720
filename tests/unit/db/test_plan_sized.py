"""Expanded IN lists come in few lengths, so PostgreSQL settles on generic plans for each (``bulk.plan_sized``)."""

from __future__ import annotations

from loyalty.db.bulk import NO_ID, PLAN_SIZED_UP_TO, plan_sized


def test_a_list_is_padded_with_an_id_no_row_has_to_the_next_power_of_two() -> None:
    assert NO_ID < 1
    assert plan_sized([]) == []
    assert plan_sized([7]) == [7]
    assert plan_sized([3, 5]) == [3, 5]
    assert plan_sized([3, 5, 9]) == [3, 5, 9, NO_ID]
    assert plan_sized(range(1, 6)) == [1, 2, 3, 4, 5, NO_ID, NO_ID, NO_ID]


def test_lengths_up_to_the_bound_take_a_few_shapes_and_keep_their_values() -> None:
    shapes = set()
    for length in range(1, PLAN_SIZED_UP_TO + 1):
        values = list(range(100, 100 + length))
        padded = plan_sized(values)
        assert padded[:length] == values
        assert set(padded[length:]) <= {NO_ID}
        shapes.add(len(padded))
    assert shapes == {2**power for power in range(11)}


def test_longer_lists_stay_as_they_are() -> None:
    values = list(range(PLAN_SIZED_UP_TO + 1))
    assert plan_sized(values) == values
