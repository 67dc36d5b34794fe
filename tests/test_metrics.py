import numpy as np
import pytest

from vsfcl.metrics import average_accuracy, backward_transfer, forgetting


def test_metrics_on_known_matrix():
    matrix = np.array([[0.9, 0.1, 0.0], [0.7, 0.95, 0.2], [0.6, 0.8, 0.99]])
    assert average_accuracy(matrix) == pytest.approx((0.6 + 0.8 + 0.99) / 3)
    assert backward_transfer(matrix) == pytest.approx(((0.6 - 0.9) + (0.8 - 0.95)) / 2)
    assert forgetting(matrix) == pytest.approx(((0.9 - 0.6) + (0.95 - 0.8)) / 2)


def test_metrics_undefined_for_single_row():
    matrix = np.array([[0.9, 0.8]])
    assert average_accuracy(matrix) == pytest.approx(0.85)
    assert backward_transfer(matrix) is None
    assert forgetting(matrix) is None
