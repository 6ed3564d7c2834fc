"""How `similar`, the demo and the report show a listing's values."""

import pytest

from lib.lookup import format_value


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        (2022.0, "2022"),  # a year read as a double: no thousands separator
        (2022, "2022"),
        (46600, "46,600"),
        (22900.0, "22,900"),
        (123.4, "123"),
        (3.25, "3.25"),
        (None, "?"),
        (True, "True"),
        (["wifi", "kitchen"], "wifi, kitchen"),
    ],
)
def test_values_are_shown_as_a_reader_expects(value, shown):
    assert format_value(value) == shown
