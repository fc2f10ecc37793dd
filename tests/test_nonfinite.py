"""The trainer's warning about samples that losses left out for non-finite values (jdistill/nonfinite.py)."""

from __future__ import annotations

import logging

from helpers import logged_metrics, small_swiftbrush

from jdistill import train
from jdistill.nonfinite import nonfinite_rows, warn_nonfinite_rows


def test_warns_once_for_the_updates_that_left_samples_out(caplog):
    values = {
        "generator/loss": 0.3,
        "generator/nonfinite_rows": 1.5,
        "fake_score/nonfinite_rows": 0.0,
        "discriminator/nonfinite_rows": 2.0,
        "steps_per_sec": 3.0,
    }
    assert nonfinite_rows(values) == {"generator": 1.5, "discriminator": 2.0}
    with caplog.at_level(logging.WARNING, logger="jdistill"):
        line = warn_nonfinite_rows(values, step=40)
    assert [r.getMessage() for r in caplog.records] == [line]
    assert (
        line.startswith("step 40: non-finite samples left out") and "discriminator 2, generator 1.5" in line
    )


def test_silent_without_left_out_samples(caplog):
    with caplog.at_level(logging.WARNING, logger="jdistill"):
        assert warn_nonfinite_rows({"generator/nonfinite_rows": 0.0, "generator/loss": 1.0}, step=2) is None
    assert not caplog.records


def test_the_metrics_log_carries_the_counts(tmp_path, monkeypatch):
    """Two steps of swiftbrush:gmm: every logged step has both updates' counts (zero: nothing left out), and the
    trainer hands each logged window to the warning."""
    warned = []
    monkeypatch.setattr(
        train, "warn_nonfinite_rows", lambda values, step: warned.append((step, dict(values)))
    )
    config = small_swiftbrush(("num_steps", "2"), ("log_every", "1"), ("checkpoint.every", "0"))
    train.train(config, str(tmp_path))
    assert [step for step, _ in warned] == [1, 2]
    assert all("generator/nonfinite_rows" in values for _, values in warned)
    logged = logged_metrics(tmp_path)
    steps = [entry for entry in logged if "generator/loss" in entry]
    assert [e["step"] for e in steps] == [1, 2]
    for entry in steps:
        assert entry["generator/nonfinite_rows"] == 0.0 and entry["fake_score/nonfinite_rows"] == 0.0
        assert nonfinite_rows(entry) == {}


def test_each_loss_counts_the_rows_it_leaves_out():
    import jax.numpy as jnp
    import numpy as np

    from jdistill.methods.distribution import masked_mean

    values = jnp.array([1.0, jnp.nan, 3.0, 4.0, jnp.inf])
    ok = jnp.array([True, True, False, True, True])
    mean, dropped = masked_mean(values, ok)
    np.testing.assert_allclose(float(mean), (1.0 + 4.0) / 2)  # rows 1 and 4: not finite, row 2: not ok
    assert float(dropped) == 3.0
    # A loss's own count (<update>/<loss>_nonfinite_rows) is reported beside the update's.
    counts = nonfinite_rows({"generator/gan_g_nonfinite_rows": 2.0, "generator/nonfinite_rows": 1.0})
    assert counts == {"generator/gan_g": 2.0, "generator": 1.0}


def test_micro_batches_add_their_counts_and_average_the_rest():
    import jax
    import jax.numpy as jnp

    from jdistill import microbatch

    def loss_fn(params, batch, key, carry):
        x = batch["x"]
        bad = jnp.sum(jnp.logical_not(jnp.isfinite(x)).astype(jnp.float32))
        loss = params * jnp.sum(jnp.where(jnp.isfinite(x), x, 0.0))
        return loss, ({"nonfinite_rows": bad, "gan_d_nonfinite_rows": 2 * bad, "loss": loss}, carry)

    x = jnp.array([1.0, jnp.nan, 2.0, jnp.nan, 3.0, 4.0])  # split 2 ways: rows 0,2,4 and 1,3,5
    batches = microbatch.split({"x": x}, 2)
    _, metrics, _, _ = microbatch.accumulate(loss_fn, jnp.float32(1.0), batches, jax.random.key(0), {}, 2, 3)
    assert float(metrics["nonfinite_rows"]) == 2.0  # both NaNs sit in the second micro-batch: 0 + 2
    assert float(metrics["gan_d_nonfinite_rows"]) == 4.0
    assert float(metrics["loss"]) == ((1.0 + 2.0 + 3.0) + 4.0) / 2
