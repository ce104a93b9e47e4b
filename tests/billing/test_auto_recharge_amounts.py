"""The amount auto-recharge charges (``billing.auto_recharge.charge_cents``), as properties:
whole cents; uncapped, it brings the wallet to the target and less than a cent beyond;
capped, the month's charges never pass the cap."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from tollway.billing.auto_recharge import charge_cents

CENT = 10_000_000
nano = st.integers(min_value=0, max_value=10**15)


@given(target=st.integers(min_value=1, max_value=10**13), available=nano, left=nano)
def test_a_charge_reaches_the_target_within_a_cent_or_uses_up_the_cap(
        target: int, available: int, left: int) -> None:
    cents = charge_cents(target, available, left)
    assert cents >= 0 and cents * CENT <= left  # never past the cap
    wanted_cents = -(-(target - available) // CENT)  # whole cents to reach the target
    if available >= target:
        assert cents == 0
    elif wanted_cents * CENT <= left:
        # not stopped by the cap: the wallet ends at the target, less than a cent beyond
        assert target <= available + cents * CENT < target + CENT
    else:  # stopped by the cap: all the whole cents it has left
        assert cents == left // CENT


@given(target=st.integers(min_value=1, max_value=10**13), available=nano,
       cap=st.integers(min_value=0, max_value=10**13),
       spends=st.lists(st.integers(min_value=1, max_value=10**12), max_size=20))
def test_the_charges_of_a_month_never_pass_its_cap(target: int, available: int, cap: int,
                                                    spends: list[int]) -> None:
    charged = 0
    for spent in spends:
        available = max(0, available - spent)
        cents = charge_cents(target, available, cap - charged)
        charged += cents * CENT
        available += cents * CENT
    assert 0 <= charged <= cap


def test_examples_by_hand() -> None:
    # 20.00 - 1.10 = 18.90; 20.00 - 3.999999999 = 16.000000001 -> 16.01 (rounded up)
    assert charge_cents(20_000_000_000, 1_100_000_000, 100 * 10**9) == 1890
    assert charge_cents(20_000_000_000, 3_999_999_999, 100 * 10**9) == 1601
    # 16.50 wanted, 9.005 left of the cap -> 9.00 (rounded down)
    assert charge_cents(20_000_000_000, 3_500_000_000, 9_005_000_000) == 900
    assert charge_cents(20_000_000_000, 20_000_000_000, 10**9) == 0
    assert charge_cents(20_000_000_000, 0, -5) == 0
