"""A plain eager port of one training iteration, exactly as the original computed it.

No work is shared: the four losses come from separate forward passes with the
current parameters (G is run again for g_loss, as the original's separate
`test` calls did), then the chosen net trains:

* D: zero_grad, forward D(G(z).detach()) with label 0, backward, step;
     zero_grad, forward D(x) with label 1, backward, step;
* G: zero_grad, forward D(G(z)) with label 1, backward, step of G's optimizer
     only (the gradients D receives are discarded: D's next update zeroes them).

This is the yardstick for tests/test_step_equivalence.py (same numbers as
gan_trainer.train_step) and for tests/bench_speed.py (the speed of a naive port).
"""
import torch

import gan_trainer
from gan_trainer import FAKE, REAL, choose_net, cost


def reference_batch(data, batch_size):
    """A batch drawn in the iteration, as a plain port draws it: batch_size distinct rows
    (by rejection; the original's numpy.random.choice permuted all n rows), scaled to [-1, 1]."""
    n = len(data)
    while True:
        idx = torch.randint(n, (batch_size,), device=data.device)
        if torch.unique(idx).numel() == batch_size:
            return gan_trainer.to_unit_range(data[idx])


def reference_losses(gen, dis, x, z):
    """(d_pos_loss, d_neg_loss, g_loss), three independent evaluations, no graph."""
    with torch.no_grad():
        d_pos_loss = cost(dis(x), REAL)
        d_neg_loss = cost(dis(gen(z)), FAKE)
        g_loss = cost(dis(gen(z)), REAL)
    return d_pos_loss, d_neg_loss, g_loss


def reference_step(gen, dis, opt_g, opt_d, x, z, schedule):
    """One iteration; returns (d_pos_loss, d_neg_loss, g_loss, net).

    net is "" (nothing trained) when a loss is not finite, as in train_step.
    """
    d_pos_loss, d_neg_loss, g_loss = reference_losses(gen, dis, x, z)
    # The original computed d_loss in Python (float64) from the two float32 costs.
    d_loss = (float(d_pos_loss) + float(d_neg_loss)) / 2
    g = float(g_loss)
    if not (torch.isfinite(torch.tensor(d_loss + g, dtype=torch.float64))):
        return d_pos_loss, d_neg_loss, g_loss, ""
    net = choose_net(schedule, d_loss > g)
    if net == "dis":
        opt_d.zero_grad()
        cost(dis(gen(z).detach()), FAKE).backward()
        opt_d.step()
        opt_d.zero_grad()
        cost(dis(x), REAL).backward()
        opt_d.step()
    else:
        opt_g.zero_grad()
        cost(dis(gen(z)), REAL).backward()
        opt_g.step()
        opt_d.zero_grad()  # D's gradients from this pass are discarded
    return d_pos_loss, d_neg_loss, g_loss, net


def make_optimizers(cfg, gen, dis, **adam_kwargs):
    """The tutorial's Adam (lr, beta1 = 0.5) for both nets, as gan_trainer.train builds them."""
    opt_g = torch.optim.Adam(gen.parameters(), lr=cfg.lr, betas=(cfg.beta1, 0.999), **adam_kwargs)
    opt_d = torch.optim.Adam(dis.parameters(), lr=cfg.lr, betas=(cfg.beta1, 0.999), **adam_kwargs)
    return opt_g, opt_d


def run_reference(gen, dis, opt_g, opt_d, batches, schedule=None):
    """Run reference_step over [(x, z), ...]; returns the per-iteration (losses..., net) and the schedule."""
    schedule = schedule or gan_trainer.Schedule()
    out = []
    for x, z in batches:
        r = reference_step(gen, dis, opt_g, opt_d, x, z, schedule)
        out.append(r)
        if not r[3]:
            break
        schedule = gan_trainer.advance(schedule, r[3])
    return out, schedule
