"""Gradient norms of ReFL's two losses on the trainable weights, to choose the reward weight λ.

    python experiments/toyworld/grad_balance.py --config configs/method/refl.yaml \
        --config configs/experiment/toyworld.yaml --config configs/experiment/toyworld_refl_caption.yaml \
        --batches 3 [--model.init_args.reward.init_args.surrogate=prompt_likelihood ...]   # CLI overrides

For a few training batches of the config, prints |∇ φ(r)| (the reward loss at λ = 1, through the config's
own ReFL sampling) and |∇ L_pre| (the noise-prediction loss on the batch's real pairs). λ sets the ratio of
the two: a λ copied from another model and reward (RealignDiff's 1e-3 for SD1.5 and its caption reward)
can leave the reward term negligible or dominant.
"""

from __future__ import annotations

import argparse

import torch

from t2i_align.cli import T2ICLI
from t2i_align.lightning_modules.base import batch_pairs, batch_prompts


def grad_norm(loss: torch.Tensor, params: list[torch.Tensor]) -> float:
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return float(torch.sqrt(sum((g.float() ** 2).sum() for g in grads if g is not None)))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, default=3)
    # every other argument goes to the CLI in order: the --config stack of a ReFL experiment (with train_pairs
    # for L_pre) and overrides, e.g. --model.init_args.reward.init_args.surrogate=prompt_likelihood
    a, cli_args = p.parse_known_args(argv)

    args = [*cli_args, "--trainer.logger=false", "--trainer.callbacks=[]"]
    cli = T2ICLI(args=args, run=False)
    module, data = cli.model, cli.datamodule
    data.setup("fit")
    module.train()
    params = [q for q in module.parameters() if q.requires_grad]
    weight, module.reward_weight = module.reward_weight, 1.0
    ratios = []
    for k, (batch, *_) in zip(range(a.batches), data.train_dataloader()):
        gen = torch.Generator().manual_seed(k)
        reward_loss, rewards, m = module.refl_loss(batch_prompts(batch, "ReFL"), gen)
        pairs = batch_pairs(batch, "L_pre")
        pre = module.generator.denoising_loss(pairs["pixel_values"], pairs["captions"], gen)
        g_reward, g_pre = grad_norm(reward_loss, params), grad_norm(pre, params)
        ratios.append(g_reward / g_pre)
        print(f"batch {k}: grad step m={m}, mean reward {rewards.mean():.3f}, |grad phi(r)| at lambda=1 {g_reward:.4g}, "
              f"|grad L_pre| {g_pre:.4g}, ratio {ratios[-1]:.2f}")
    mean = sum(ratios) / len(ratios)
    print(f"mean ratio {mean:.2f}: with the config's lambda={weight:g} the reward gradient is {weight * mean:.3g} x L_pre's")


if __name__ == "__main__":
    main()
