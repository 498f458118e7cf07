from convserve.models.arithmetic_torch import analyze_module
from convserve.models.paper import TABLE_1, compare
from convserve.models.zoo import get_model


def test_googlenet_table_1_comparison():
    rows = {r.label: r for r in compare(analyze_module(get_model("googlenet"), (3, 224, 224)))}
    assert len(rows) == len(TABLE_1)
    # rows worked out by hand: 3a = 163,328 weights = 159.5K (K = 1024), 128.0M MACs
    assert abs(rows["inception (3a)"].computed_params_k - 159.5) < 0.01
    assert abs(rows["inception (3a)"].computed_ops_m - 128.05) < 0.01
    assert not rows["inception (3a)"].marked
    # conv1: 7*7*3*64 = 9,408 weights against the paper's 2.7K
    assert rows["convolution 7x7/2"].computed_params_k * 1024 == 9408
    marked = {label for label, r in rows.items() if r.marked}
    assert marked == {"convolution 7x7/2", "inception (4c)", "inception (5a)"}
