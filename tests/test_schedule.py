"""The choice rule: which net trains (choose_net) and the strike count (advance)."""
import pytest

from gan_trainer import MAX_STRIKE, Schedule, advance, choose_net


def test_start_state():
    assert Schedule() == Schedule("dis", 0)
    assert MAX_STRIKE == 5


@pytest.mark.parametrize("net", ["dis", "gen"])
@pytest.mark.parametrize("strike", [0, 1, 4])
def test_larger_d_loss_trains_d_otherwise_g(net, strike):
    s = Schedule(net, strike)
    assert choose_net(s, d_loss_larger=True) == "dis"
    assert choose_net(s, d_loss_larger=False) == "gen"


def test_after_five_d_in_a_row_g_trains_even_if_d_loss_is_larger():
    assert choose_net(Schedule("dis", 5), d_loss_larger=True) == "gen"
    assert choose_net(Schedule("dis", 5), d_loss_larger=False) == "gen"


def test_after_five_g_in_a_row_d_trains_even_if_d_loss_is_smaller():
    assert choose_net(Schedule("gen", 5), d_loss_larger=False) == "dis"
    assert choose_net(Schedule("gen", 5), d_loss_larger=True) == "dis"


def test_strike_counting():
    assert advance(Schedule(), "dis") == Schedule("dis", 1)
    assert advance(Schedule(), "gen") == Schedule("gen", 1)
    assert advance(Schedule("dis", 3), "dis") == Schedule("dis", 4)
    assert advance(Schedule("dis", 3), "gen") == Schedule("gen", 1)
    assert advance(Schedule("gen", 5), "dis") == Schedule("dis", 1)
    assert advance(Schedule("gen", 2), "gen") == Schedule("gen", 3)


def test_advance_is_pure():
    s = Schedule("dis", 2)
    advance(s, "dis")
    assert s == Schedule("dis", 2)


@pytest.mark.parametrize("d_loss_larger, pattern", [(True, "DDDDDG" * 3), (False, "GGGGGD" * 2)],
                         ids=["d_larger-five_d_one_g", "d_smaller-five_g_one_d"])
def test_one_net_always_larger_alternates_five_and_one(d_loss_larger, pattern):
    s, trained = Schedule(), []
    for _ in pattern:
        net = choose_net(s, d_loss_larger=d_loss_larger)
        trained.append(net)
        s = advance(s, net)
    assert "".join("D" if n == "dis" else "G" for n in trained) == pattern
