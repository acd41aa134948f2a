"""Write (and execute) the teaching notebooks from this one file, so that they are reviewed as code.

    python notebooks/build_notebooks.py                 # write every notebook, execute it, save with outputs
    python notebooks/build_notebooks.py 02 03           # only the notebooks whose names start with these
    python notebooks/build_notebooks.py --no-execute    # write the cells only (no outputs)

Each notebook is a list of markdown and code cells below. The code cells only *call* nabla_gfn.py,
toy_2d.py, toy_digits.py and sd_finetune.py (and the baseline modules); what is written here is narration,
numerical checks of the equations, and plotting. The notebooks are executed in `notebooks/` (the
first code cell puts the repository root on sys.path), with the pretrained models cached under
$NABLA_GFN_CACHE (default ~/.cache/nabla-gfn). tests/test_notebooks.py executes the committed
notebooks headless and checks that their cells are exactly what this file writes.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import nbformat

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
KERNEL = {"display_name": "Python 3", "language": "python", "name": "python3"}


def md(text: str) -> nbformat.NotebookNode:
    return nbformat.v4.new_markdown_cell(textwrap.dedent(text).strip())


def code(*parts: str) -> nbformat.NotebookNode:
    return nbformat.v4.new_code_cell("\n\n".join(textwrap.dedent(p).strip() for p in parts))


# The first code cell of every notebook: find the repository root from the kernel's working
# directory (notebooks/ when opened with `jupyter lab notebooks/`), then plot settings.
SETUP = """
import sys
from pathlib import Path

ROOT = next(p for p in (Path.cwd(), *Path.cwd().parents) if (p / "nabla_gfn.py").is_file())
sys.path.insert(0, str(ROOT))  # nabla_gfn.py, toy_2d.py, sd_finetune.py live in the repository root

import warnings

import matplotlib.pyplot as plt
import numpy as np
import torch

warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm's notebook bars want ipywidgets
%matplotlib inline
plt.rcParams.update({"figure.dpi": 70, "font.size": 9, "axes.titlesize": 9, "legend.fontsize": 8})
"""


# ----------------------------------------------------------------------------------------------
# 01 — the derivation, each equation checked on the 2-D toy
# ----------------------------------------------------------------------------------------------


def notebook_01() -> List[nbformat.NotebookNode]:
    return [
        md(r"""
        # 01 · From detailed balance to residual ∇-DB to the forward-looking flow

        ∇-GFlowNet (Liu et al., ICLR 2025, [arXiv:2412.07775](https://arxiv.org/abs/2412.07775))
        finetunes a pretrained diffusion sampler towards the reward-tilted target
        $p^*(x_0) \propto p^\sharp(x_0)\,R(x_0)^\beta$ with a loss made only of *gradients*. This
        notebook builds that loss one idea at a time. Every equation is followed by a numerical check
        on the 2-D toy of `toy_2d.py` (a ring of 8 Gaussians, a Gaussian-bump reward), where the
        target, the noised marginals and the residual flow are all known in closed form.

        The math is not written here: every quantity comes from `nabla_gfn.py` (the algorithm) or
        `toy_2d.py` (exact Gaussian-mixture quantities). The notebook calls them, checks them and plots.

        **Time convention (diffusers).** A trajectory runs from noise $x_T$ (step 0) to the clean
        sample $x_0$ (step $T$). $x$ is the current, noisier state at timestep $\tau$; $x'$ the next,
        cleaner state at $\tau' < \tau$. The paper indexes the other way (its $x_0$ is the noise and
        its $x_t \to x_{t+1}$ is our $x \to x'$); equation numbers below refer to the paper.
        """),
        code(SETUP, """
        import copy
        import dataclasses

        import nabla_gfn as ng
        import toy_2d

        cfg = toy_2d.ToyConfig()               # toy_2d's current defaults: prior, reward, β, T, γ, weighting, ...
        torch.set_num_threads(cfg.threads)     # tiny MLPs run fastest on one thread
        torch.manual_seed(0)
        task = toy_2d.build_task(cfg)          # prior p♯ (a GMM), reward r = log R, β, exact target p* (a GMM)
        scheduler = toy_2d.sd_scheduler()      # diffusers' DDIMScheduler with Stable Diffusion v1.5's noise schedule
        schedule = ng.ddim_schedule(scheduler, cfg.num_steps)
        reference = toy_2d.pretrain(cfg, task.prior, scheduler, quiet=True)  # ε̂♯, cached under $NABLA_GFN_CACHE
        eps_ref = toy_2d.as_eps_fn(reference)  # the eps_fn(x, t, traj) signature nabla_gfn takes
        print(f"prior {cfg.prior!r}, reward {cfg.reward!r}, β = {cfg.beta}, T = {cfg.num_steps} steps, "
              f"γ = {cfg.gamma!r}, weighting = {cfg.weighting!r}")
        """),
        code("""
        # plotting helpers (presentation only)
        def grid(n=121, lim=5.0):
            xs = torch.linspace(-lim, lim, n, dtype=torch.float64)
            gx, gy = torch.meshgrid(xs, xs, indexing="xy")
            return gx, gy, torch.stack([gx.reshape(-1), gy.reshape(-1)], 1)

        def scatter(ax, x, title, lim=5.0, color="C0"):
            x = x.detach().numpy()
            ax.scatter(x[:, 0], x[:, 1], s=1, alpha=0.3, color=color, rasterized=True)
            ax.set(xlim=(-lim, lim), ylim=(-lim, lim), aspect="equal", title=title, xticks=[], yticks=[])

        def coefficients(schedule, i, n):
            \"\"\"(ᾱ, ᾱ', σ) of step i, one per row: the schedule terms nabla_gfn's step functions take.\"\"\"
            return [getattr(schedule, f)[i].expand(n) for f in ("alpha_bar", "alpha_bar_next", "sigma")]
        """),
        md(r"""
        ## 1 · The target

        The reward model gives $r(x_0) = \log R(x_0)$ and $\beta > 0$ scales it. The finetuned model
        should sample

        $$p^*(x_0) \;\propto\; p^\sharp(x_0)\,R(x_0)^\beta \;=\; p^\sharp(x_0)\,e^{\beta r(x_0)},$$

        the pretrained distribution *reweighted*, not collapsed onto the reward's maximum. For a
        Gaussian-mixture prior and a Gaussian (or linear) log-reward, $p^*$ is again a Gaussian
        mixture; `toy_2d` computes it in closed form (`GaussianReward.tilt`).

        **Check:** normalise $p^\sharp e^{\beta r}$ numerically on a grid and compare with the closed form.
        """),
        code("""
        gx, gy, pts = grid()
        cell = float(gx[0, 1] - gx[0, 0]) ** 2
        tilted = (task.prior.log_prob(pts) + task.beta * task.reward(pts)).exp()
        tilted = tilted / (tilted.sum() * cell)                  # p♯ e^{βr} / Z by quadrature
        closed = task.target.log_prob(pts).exp()                 # toy_2d's closed-form tilted GMM
        print(f"L1 distance between the quadrature and the closed-form target: {float((tilted - closed).abs().sum() * cell):.1e}")
        print("mode weights, prior :", np.round(task.prior.weights.numpy(), 3))
        print("mode weights, target:", np.round(task.target.weights.numpy(), 3))

        fig, axes = plt.subplots(1, 3, figsize=(10, 3.4))
        panels = [(task.prior.log_prob(pts).exp(), "prior p♯"), (task.reward(pts), "log-reward r"),
                  (closed, "target p* ∝ p♯ · R^β")]
        for ax, (values, title) in zip(axes, panels):
            ax.contourf(gx, gy, values.reshape(gx.shape), levels=30)
            ax.set(aspect="equal", title=title, xticks=[], yticks=[])
        plt.show()
        """),
        md(r"""
        ## 2 · The policy: one Gaussian denoising step

        The sampler is DDPM, i.e. DDIM with $\eta = 1$. From the noise prediction $\hat\epsilon(x,\tau)$:

        $$\hat x_0(x) = \frac{x - \sqrt{1-\bar\alpha_\tau}\,\hat\epsilon(x,\tau)}{\sqrt{\bar\alpha_\tau}},\qquad
        \mu(x) = \sqrt{\bar\alpha_{\tau'}}\,\hat x_0(x) + \sqrt{1-\bar\alpha_{\tau'}-\sigma_\tau^2}\;\hat\epsilon(x,\tau),\qquad
        \sigma_\tau^2 = \frac{1-\bar\alpha_{\tau'}}{1-\bar\alpha_\tau}\Big(1-\frac{\bar\alpha_\tau}{\bar\alpha_{\tau'}}\Big),$$

        $$P_F(x'\mid x) = \mathcal N\big(x';\,\mu(x),\,\sigma_\tau^2 I\big),\qquad
        \nabla_{x'}\log P_F(x'\mid x) = -\frac{x'-\mu(x)}{\sigma_\tau^2}.$$

        `ng.ddim_schedule` reads $\bar\alpha_\tau, \bar\alpha_{\tau'}, \sigma_\tau$ off the diffusers
        scheduler; `ng.x0_prediction` and `ng.step_mean` are the two formulas; `ng.sample_trajectory`
        runs the chain. $P_F^\sharp$ uses the pretrained $\hat\epsilon^\sharp$, $P_F^\theta$ the finetuned
        $\hat\epsilon_\theta$; both share $\sigma_\tau$.

        **Checks:** one of our steps equals `DDIMScheduler.step(eta=1)` given the same noise; the
        closed-form step score equals autograd of `ng.gaussian_log_prob`.
        """),
        code("""
        gen = torch.Generator().manual_seed(0)
        traj = toy_2d.sample(eps_ref, schedule, 512, gen)   # ng.sample_trajectory from x_T ~ N(0, I): states (512, T+1, 2)

        i, n = 20, 8
        x, t = traj.states[:n, i], schedule.timesteps[i].expand(n)
        eps = eps_ref(x, t, None)
        z = torch.randn(x.shape, generator=gen)
        ours = ng.step_mean(x, eps, *coefficients(schedule, i, n)) + schedule.sigma[i] * z
        theirs = scheduler.step(eps, int(schedule.timesteps[i]), x, eta=1.0, variance_noise=z).prev_sample
        print(f"step {i}: max |ours − DDIMScheduler.step(eta=1)| = {float((ours - theirs).abs().max()):.1e}")

        x_next = traj.states[:n, i + 1].clone().requires_grad_(True)
        mean = ng.step_mean(x, eps, *coefficients(schedule, i, n))
        (autograd_score,) = torch.autograd.grad(ng.gaussian_log_prob(x_next, mean, schedule.sigma[i].expand(n)).sum(), x_next)
        closed_form = -(x_next.detach() - mean) / schedule.sigma[i] ** 2
        print(f"max |closed-form step score − autograd| = {float((closed_form - autograd_score).abs().max()):.1e}")

        fig, axes = plt.subplots(1, 3, figsize=(11, 3.4))
        steps = np.arange(cfg.num_steps)
        axes[0].plot(steps, schedule.alpha_bar, label="ᾱ_τ"), axes[0].plot(steps, schedule.sigma, label="σ_τ")
        axes[0].set(xlabel="step (0 = noise)", yscale="log", title="schedule (SD v1.5 betas)"), axes[0].legend()
        scatter(axes[1], traj.states[:, 0], "x_T (step 0): noise")
        scatter(axes[2], traj.final, "x_0 from P_F♯, with 5 paths")
        for path in traj.states[:5].numpy():
            axes[2].plot(path[:, 0], path[:, 1], lw=0.7)
        plt.show()
        """),
        md(r"""
        ## 3 · Detailed balance, divided: the residual flow

        A GFlowNet with the fixed noising process $P_B$ as its backward policy satisfies detailed
        balance with some flow $F$; so does the pretrained model with its own flow $F^\sharp$:

        $$F(x)\,P_F^\theta(x'\mid x) = F(x')\,P_B(x\mid x'),\qquad F^\sharp(x)\,P_F^\sharp(x'\mid x) = F^\sharp(x')\,P_B(x\mid x').$$

        Divide the two: $P_B$ cancels. With the **residual flow** $\tilde F = F/F^\sharp$ and the boundary
        condition $\tilde F(x_0) = R(x_0)^\beta$,

        $$\tilde F(x)\,\frac{P_F^\theta(x'\mid x)}{P_F^\sharp(x'\mid x)} = \tilde F(x').$$

        What is $\tilde F$ at the solution? The optimal policy is $P_F^*(x'|x) = P_F^\sharp(x'|x)\,\tilde F(x')/\tilde F(x)$;
        it is normalised iff $\tilde F(x) = \int P_F^\sharp(x'|x)\tilde F(x')\,dx'$, so by induction from
        $x_0$: $\tilde F_\tau(x) = \mathbb E_{P^\sharp}[R(x_0)^\beta \mid x_\tau = x]$. Since the tilted
        marginal is $p^*_\tau \propto p^\sharp_\tau\,\tilde F_\tau$,

        $$\nabla\log\tilde F_\tau(x) = \nabla\log p^*_\tau(x) - \nabla\log p^\sharp_\tau(x),\qquad
        \nabla\log\tilde F(x_0) = \beta\,\nabla r(x_0).$$

        For the toy both $p^*_\tau$ and $p^\sharp_\tau$ are Gaussian mixtures noised in closed form:
        `toy_2d.exact_flow_score`.

        **Checks:** at $\bar\alpha = 1$ the exact residual flow equals $\beta\nabla r$ (autograd); at
        every noise level it equals autograd of $\log p^*_\tau - \log p^\sharp_\tau$.
        """),
        code("""
        F64 = torch.float64
        x = (2.5 * torch.randn(256, 2, generator=gen, dtype=F64)).requires_grad_(True)
        (grad_r,) = torch.autograd.grad(task.reward(x).sum(), x)
        at_data = toy_2d.exact_flow_score(task.prior, task.target, x.detach(), torch.ones(1, dtype=F64))
        print(f"ᾱ = 1: max |exact ∇log F̃ − β∇r| = {float((at_data - task.beta * grad_r).abs().max()):.1e}")
        for a in (0.9, 0.5, 0.1, 0.01):
            ab = torch.full((len(x),), a, dtype=F64)
            (auto,) = torch.autograd.grad((task.target.log_prob(x, ab) - task.prior.log_prob(x, ab)).sum(), x)
            exact = toy_2d.exact_flow_score(task.prior, task.target, x.detach(), ab)
            print(f"ᾱ = {a:<4}: max |exact ∇log F̃ − autograd(log p*_τ − log p♯_τ)| = {float((exact - auto).abs().max()):.1e}")
        """),
        code("""
        gx, gy, pts = grid(n=15, lim=4.0)
        dense_x, dense_y, dense = grid(n=101, lim=4.0)
        fig, axes = plt.subplots(1, 4, figsize=(13, 3.6))
        for ax, i in zip(axes, (0, 20, 35, cfg.num_steps - 1)):
            a = schedule.alpha_bar[i].double()
            ax.contourf(dense_x, dense_y, task.target.log_prob(dense, a.expand(len(dense))).exp().reshape(dense_x.shape),
                        levels=20, cmap="Greys")
            flow = toy_2d.exact_flow_score(task.prior, task.target, pts, a)
            ax.quiver(pts[:, 0], pts[:, 1], flow[:, 0], flow[:, 1], color="C3")
            ax.set(aspect="equal", xticks=[], yticks=[],
                   title=f"step {i}, ᾱ = {float(a):.3f}\\nmax ‖∇log F̃‖ = {float(flow.norm(dim=1).max()):.2f}")
        fig.suptitle("exact residual flow ∇log F̃_τ (arrows, autoscaled per panel) over p*_τ (grey)")
        plt.show()
        """),
        md(r"""
        At high noise the residual flow is weak and smooth: $x_\tau$ says little about which mode
        $x_0$ will land in. Near the data end it is $\beta\nabla r$ itself, pointing at the reward's
        centre everywhere. In between it reweights the modes.

        ## 4 · Residual ∇-DB: differentiate, and every normaliser drops out

        Take $\log$ of the residual balance and differentiate with respect to $x'$ and to $x$. The flow
        at the *other* state does not depend on the variable, so it drops out, and so does every
        normalising constant — there is no $\log Z$ to learn (paper eqs. 9–10):

        $$\textbf{forward:}\quad \nabla_{x'}\big[\log P_F^\theta(x'|x) - \log P_F^\sharp(x'|x)\big] = \nabla\log\tilde F(x')$$
        $$\textbf{reverse:}\quad \nabla_{x}\big[\log P_F^\theta(x'|x) - \log P_F^\sharp(x'|x)\big] = -\nabla\log\tilde F(x)$$

        For Gaussian steps with a shared $\sigma_\tau$ the forward left side is closed form and $x'$
        cancels: $(\mu_\theta(x) - \mu^\sharp(x))/\sigma_\tau^2$ (`ng.forward_residual`). The reverse
        left side is a vector–Jacobian product through the ε-network; `ng.nabla_db_loss` takes it with
        autograd.

        **Checks** with a perturbed copy of the pretrained network as $\theta$: the forward residual
        equals autograd of the log-ratio in $x'$, for any $x'$; the reverse residual equals central
        finite differences in $x$ (float64).
        """),
        code("""
        policy = copy.deepcopy(reference)
        with torch.no_grad():
            for p in policy.parameters():
                p.add_(0.02 * torch.randn(p.shape, generator=gen))
        eps_pol = toy_2d.as_eps_fn(policy)

        i, n = 30, 4
        x, t = traj.states[:n, i], schedule.timesteps[i].expand(n)
        coef = coefficients(schedule, i, n)
        mean_pol, mean_ref = ng.step_mean(x, eps_pol(x, t, None), *coef), ng.step_mean(x, eps_ref(x, t, None), *coef)
        closed_form = ng.forward_residual(mean_pol, mean_ref, coef[2])
        for shift in (0.0, 1.0, 10.0):  # the same closed form at x', x' + 1, x' + 10
            x_next = (traj.states[:n, i + 1] + shift).requires_grad_(True)
            log_ratio = ng.gaussian_log_prob(x_next, mean_pol, coef[2]) - ng.gaussian_log_prob(x_next, mean_ref, coef[2])
            (auto,) = torch.autograd.grad(log_ratio.sum(), x_next)
            print(f"x' + {shift:>4}: max |(μ_θ − μ♯)/σ² − ∇_x' log-ratio| = {float((closed_form - auto).abs().max()):.1e}")

        pol64, ref64 = copy.deepcopy(policy).double(), copy.deepcopy(reference).double()
        coef64, x64, x_next64 = [c.double() for c in coef], x.double(), traj.states[:n, i + 1].double()

        def log_ratio(x):  # log P_F^θ(x'|x) − log P_F♯(x'|x) as a function of x
            log_p = lambda net: ng.gaussian_log_prob(x_next64, ng.step_mean(x, net(x, t), *coef64), coef64[2])
            return log_p(pol64) - log_p(ref64)

        xg = x64.clone().requires_grad_(True)
        (reverse,) = torch.autograd.grad(log_ratio(xg).sum(), xg)
        h = 1e-6
        finite_diff = torch.stack([(log_ratio(x64 + h * e) - log_ratio(x64 - h * e)) / (2 * h) for e in torch.eye(2, dtype=F64)], 1)
        print(f"max |reverse residual (autograd) − finite differences| = {float((reverse - finite_diff).abs().max()):.1e}"
              f"  (entries of size {float(reverse.abs().max()):.1f})")
        """),
        md(r"""
        The forward equation says what the optimal step looks like: its mean is the pretrained mean
        shifted by $\sigma_\tau^2$ times the residual flow at the next state. No Gaussian satisfies it
        for every $x'$ when $\log\tilde F$ is not linear, so `toy_2d.sample_oracle` linearises at
        $\mu^\sharp$: $\mu^* = \mu^\sharp(x) + \sigma_\tau^2\,\nabla\log\tilde F_{\tau'}(\mu^\sharp(x))$ with
        the *exact* flow. It is the best a Gaussian-step policy can do, and the bar every finetuned
        model is judged against (TV = total variation between mode weights and the target's).
        """),
        code("""
        oracle = toy_2d.sample_oracle(task, reference, schedule, 2000, gen)
        pretrained = toy_2d.sample(eps_ref, schedule, 2000, gen).final
        exact = task.target.sample(2000, gen)
        fig, axes = plt.subplots(1, 3, figsize=(9, 3.3))
        for ax, (x, name) in zip(axes, [(pretrained, "pretrained P_F♯"), (oracle, "oracle (exact flow)"), (exact, "exact target p*")]):
            scatter(ax, x, f"{name}\\nmode TV {toy_2d.metrics(task, x)['mode_tv']:.3f}")
        plt.show()
        """),
        md(r"""
        ## 5 · The forward-looking flow

        The loss needs $\nabla\log\tilde F$ at every state, and a network $g_\phi$ learning it from
        scratch would be slow. The paper writes it as a guess plus a learned correction (eq. 12):

        $$\nabla\log\tilde F_\tau(x) \;\approx\; \beta\,\gamma_\tau\,\nabla_x r\big(\hat x_0(x)\big) + g_\phi(x,\tau),\qquad g_\phi(x_0,\cdot) = 0.$$

        Why this guess: $\log\tilde F_\tau(x) = \log\mathbb E[e^{\beta r(x_0)}\mid x_\tau = x]$, and if the
        posterior of $x_0$ given $x$ were a point mass at its mean $\hat x_0(x)$ (Tweedie), this would be
        $\beta r(\hat x_0(x))$. That is exact at the data end and increasingly wrong as the posterior
        widens; $\gamma_\tau \in \{\bar\alpha_\tau, \sqrt{\bar\alpha_\tau}\}$ damps it at high noise
        (official code: $\bar\alpha$; `toy_2d`'s default is printed at the top). $\hat x_0$ uses the
        *finetuned* $\hat\epsilon_\theta$ and the gradient runs through it, then is detached: it is a
        target, never a path for parameter gradients (`ng.forward_looking_score`).

        **Check:** `ng.forward_looking_score` equals autograd of $\beta\gamma_\tau\,r(\hat x_0(x))$.
        """),
        code("""
        i, n = 30, 64
        x, t, a = traj.states[:n, i], schedule.timesteps[i].expand(n), schedule.alpha_bar[i].expand(n)
        guess, _ = ng.forward_looking_score(eps_ref, task.log_reward, x, t, a, torch.arange(n), cfg.beta, cfg.gamma)
        xg = x.clone().requires_grad_(True)
        (auto,) = torch.autograd.grad(task.reward(ng.x0_prediction(xg, eps_ref(xg, t, None), a)).sum(), xg)
        auto = cfg.beta * ng.gamma_weight(a, cfg.gamma)[:, None] * auto
        print(f"max |forward_looking_score − autograd of βγ r(x̂_0(x))| = {float((guess - auto).abs().max()):.1e}")
        """),
        md(r"""
        **What the guess gets right and wrong at each noise level.** On the pretrained model's own
        states, compare the guess with the exact $\nabla\log\tilde F$ per step: the relative error
        (`toy_2d.flow_errors`; a zero guess scores 1), and, since $\gamma_\tau$ only scales, the
        *direction* (cosine) and the scale $\gamma^*_\tau$ that would fit best,
        $\gamma^*_\tau = \langle G, \nabla\log\tilde F\rangle / \|G\|^2$ with $G = \beta\nabla_x r(\hat x_0(x))$ undamped.
        """),
        code("""
        errors = {g: toy_2d.flow_errors(task, reference, None, traj, schedule, dataclasses.replace(cfg, gamma=g))["guess"]
                  for g in ng.GAMMA_CHOICES}
        cosine, gamma_star = [], []
        for i in range(cfg.num_steps):
            x, n = traj.states[:, i], len(traj.states)
            t, a = schedule.timesteps[i].expand(n), schedule.alpha_bar[i].expand(n)
            guess, _ = ng.forward_looking_score(eps_ref, task.log_reward, x, t, a, torch.arange(n), cfg.beta, cfg.gamma)
            undamped = guess / ng.gamma_weight(a, cfg.gamma)[:, None]          # β ∇_x r(x̂_0(x))
            exact = toy_2d.exact_flow_score(task.prior, task.target, x, a)
            cosine.append(float(torch.nn.functional.cosine_similarity(undamped, exact, dim=1).mean()))
            gamma_star.append(float((undamped * exact).sum() / undamped.pow(2).sum()))

        steps = np.arange(cfg.num_steps)
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.5))
        for g, label in (("alpha_bar", "γ = ᾱ"), ("sqrt_alpha_bar", "γ = √ᾱ")):
            axes[0].plot(steps, errors[g], label=label)
        axes[0].axhline(1.0, ls=":", c="gray", label="zero guess")
        axes[0].set(xlabel="step (0 = noise)", title="‖guess − exact ∇log F̃‖ / ‖exact‖", yscale="log"), axes[0].legend()
        axes[1].plot(steps, cosine, c="k")
        axes[1].set(xlabel="step (0 = noise)", title="direction: mean cos(guess, exact)", ylim=(min(0.0, min(cosine)) - 0.05, 1.05))
        axes[2].plot(steps, gamma_star, "k", label="best-fitting γ*")
        axes[2].plot(steps, schedule.alpha_bar, label="ᾱ"), axes[2].plot(steps, schedule.alpha_bar.sqrt(), label="√ᾱ")
        axes[2].set(xlabel="step (0 = noise)", title="scale: best γ per step vs the two choices"), axes[2].legend()
        plt.show()
        for i in (0, 10, 20, 30, 40, cfg.num_steps - 1):
            print(f"step {i:>2} (ᾱ = {float(schedule.alpha_bar[i]):.3f}): rel. error γ=ᾱ {errors['alpha_bar'][i]:.2f}, "
                  f"γ=√ᾱ {errors['sqrt_alpha_bar'][i]:.2f}; cos {cosine[i]:+.2f}; γ* {gamma_star[i]:.2f}")
        """),
        code("""
        fig, axes = plt.subplots(1, 3, figsize=(12, 4))
        for ax, i in zip(axes, (10, 30, 45)):
            x, n = traj.states[:80, i], 80
            t, a = schedule.timesteps[i].expand(n), schedule.alpha_bar[i].expand(n)
            guess, _ = ng.forward_looking_score(eps_ref, task.log_reward, x, t, a, torch.arange(n), cfg.beta, cfg.gamma)
            exact = toy_2d.exact_flow_score(task.prior, task.target, x, a)
            scale = float(exact.norm(dim=1).max()) * 8
            ax.quiver(x[:, 0], x[:, 1], exact[:, 0], exact[:, 1], color="C3", scale=scale, label="exact ∇log F̃")
            ax.quiver(x[:, 0], x[:, 1], guess[:, 0], guess[:, 1], color="C0", scale=scale, label=f"guess (γ = {cfg.gamma})")
            lim = 1.15 * float(x.abs().max())
            ax.set(xlim=(-lim, lim), ylim=(-lim, lim), aspect="equal", xticks=[], yticks=[],
                   title=f"step {i}, ᾱ = {float(a[0]):.2f}")
        axes[0].legend(loc="lower left")
        fig.suptitle("forward-looking guess vs exact residual flow, at the pretrained model's own states")
        plt.show()
        """),
        md(r"""
        Reading the plots (this toy, the pretrained model's states): near the data end the guess is
        nearly exact — the posterior of $x_0$ is narrow there, and the last transition uses
        $\beta\nabla r(x_0)$ itself. Over most of the chain the undamped guess
        $\beta\nabla r(\hat x_0)$ points the right way (cosine near 1), and the best-fitting scale
        $\gamma^*$ stays above both damping choices: what the damped guess gets wrong there is mostly
        its *size* (too small; $\sqrt{\bar\alpha}$ less so than $\bar\alpha$). Only at the highest
        noise does the direction go wrong and $\gamma^*$ drop to zero: $\hat x_0(x)$ is then near the
        ring's centre, and the reward at that one point says little about
        $\log\mathbb E[R^\beta\mid x]$, which averages over all the modes. Everything the guess
        misses is what $g_\phi$ has to learn (plotted after training in `02_toy_2d.ipynb`).

        ## 6 · The loss

        Per transition $(x,\tau)\to(x',\tau')$, with $\mathrm{sg}[\cdot]$ a stop-gradient and
        $s(x) = \beta\gamma_\tau\nabla r(\hat x_0(x))$ the guess (`ng.nabla_db_loss`, paper eqs. 10–13):

        $$L_F = \Big\|\frac{\mu_\theta(x) - \mu^\sharp(x)}{\sigma_\tau^2} - \mathrm{sg}\big[s(x')\big] - g_\phi(x',\tau')\Big\|^2 \qquad\text{(at } x' = x_0\text{: the exact } \beta\nabla r(x_0)\text{, no } g_\phi)$$
        $$L_B = \Big\|\mathrm{sg}\big[\nabla_x(\log P_F^\theta - \log P_F^\sharp)(x'|x)\big] + \mathrm{sg}\big[s(x)\big] + g_\phi(x,\tau)\Big\|^2,\qquad
        L_T = \|g_\phi(x_0)\|^2,\qquad L_\lambda = \lambda\,\|\hat\epsilon_\theta(x) - \hat\epsilon_{\text{old}}(x)\|^2.$$

        $L_F$ trains the policy (and $g_\phi$ at $x'$), $L_B$ only $g_\phi$; `ng.transition_weights`
        optionally weights each transition by powers of $\sigma_\tau^2$ (`weighting`; the paper's is
        `plain`). **Checks:**

        1. At the reference ($\theta = \sharp$, $g_\phi \equiv 0$ as initialised) with a constant reward the
           loss is exactly zero: nothing to correct.
        2. With the real reward the same model has a positive loss: that is the learning signal.
        3. At the oracle — the linearised optimal step of §4 as the policy, and $g_\phi$ = exact flow −
           guess — the loss is not exactly zero, because a Gaussian step only matches $\tilde F$ to first
           order; but it goes to zero as the steps get finer ($\sigma_\tau^2 \sim 1/T$).
        """),
        code("""
        batch = ng.gather_transitions(traj, schedule, ng.subsample_steps(cfg.num_steps, 1.0, len(traj.states), gen))
        zero_flow = toy_2d.as_eps_fn(toy_2d.make_flow(cfg))       # g_φ with its zeroed output layer
        constant_reward = lambda x0, traj: 0.0 * x0.sum(1)         # ∇r ≡ 0
        for name, log_reward in (("constant reward", constant_reward), ("real reward", task.log_reward)):
            loss, parts = ng.nabla_db_loss(batch, eps_ref, eps_ref, log_reward, zero_flow, cfg.loss_config)
            print(f"θ = ♯, g_φ = 0, {name:<15}: " + ", ".join(f"{k} {float(v):.3g}" for k, v in parts.items() if k != "reward_next"))
        """),
        code("""
        def oracle_eps_fn(schedule):
            \"\"\"ε̂ whose DDIM step mean is toy_2d.sample_oracle's μ♯ + σ² ∇log F̃_τ'(μ♯), as an eps_fn.

            step_mean is affine in ε̂, so the ε̂ that moves the mean by δ is ε̂♯ + δ / slope.
            \"\"\"
            def eps_fn(x, t, traj):
                i = (schedule.timesteps[None, :] == t[:, None]).long().argmax(1)   # step index of each row
                a, a_next, sigma = schedule.alpha_bar[i], schedule.alpha_bar_next[i], schedule.sigma[i]
                eps_sharp = reference(x, t)
                mean_sharp = ng.step_mean(x, eps_sharp, a, a_next, sigma)
                shift = sigma[:, None] ** 2 * toy_2d.exact_flow_score(task.prior, task.target, mean_sharp, a_next)
                slope = ng.step_mean(x, torch.ones_like(x), a, a_next, sigma) - ng.step_mean(x, torch.zeros_like(x), a, a_next, sigma)
                return eps_sharp + shift / slope
            return eps_fn

        def oracle_flow_fn(policy_eps):
            \"\"\"g_φ = exact ∇log F̃ − guess, so that guess + g_φ is exact; g_φ(x_0) = 0 (label t = 0).\"\"\"
            alphas_cumprod = scheduler.alphas_cumprod
            def flow(x, t, traj):
                a = alphas_cumprod[t]
                guess, _ = ng.forward_looking_score(policy_eps, task.log_reward, x, t, a, traj, cfg.beta, cfg.gamma)
                g = toy_2d.exact_flow_score(task.prior, task.target, x, a) - guess
                return torch.where((t == 0)[:, None], torch.zeros_like(g), g)
            return flow

        ratios = {}
        for T in (10, 25, 50, 100, 200):
            sched_T = ng.ddim_schedule(toy_2d.sd_scheduler(), T)
            policy_eps = oracle_eps_fn(sched_T)
            traj_T = toy_2d.sample(policy_eps, sched_T, 64, torch.Generator().manual_seed(1))
            batch_T = ng.gather_transitions(traj_T, sched_T, torch.arange(T).expand(64, T))   # every transition
            _, at_oracle = ng.nabla_db_loss(batch_T, policy_eps, eps_ref, task.log_reward, oracle_flow_fn(policy_eps), cfg.loss_config)
            _, at_reference = ng.nabla_db_loss(batch_T, eps_ref, eps_ref, task.log_reward, zero_flow, cfg.loss_config)
            ratios[T] = {k: float(at_oracle[k] / at_reference[k]) for k in ("loss", "forward", "reverse")}
            print(f"T = {T:>3}: loss at the oracle {float(at_oracle['loss']):.2e}, at the reference {float(at_reference['loss']):.2e}")

        Ts = np.array(list(ratios))
        fig, ax = plt.subplots(figsize=(4.5, 3.4))
        for key in ("loss", "forward", "reverse"):
            ax.plot(Ts, [ratios[T][key] for T in Ts], "o-", label=key)
        ax.plot(Ts, ratios[Ts[1]]["loss"] * Ts[1] / Ts, "k:", label="∝ 1/T")
        ax.set(xscale="log", yscale="log", xlabel="sampling steps T", title="loss at the oracle / loss at the reference")
        ax.legend()
        plt.show()
        """),
        md(r"""
        Next: `02_toy_2d.ipynb` trains $\theta$ and $g_\phi$ with this loss on the same toy and
        watches the samples move towards the exact target.
        """),
    ]


# ----------------------------------------------------------------------------------------------
# 02 — the toy: pretrain, finetune, watch the samples move, the learned flow, the baselines
# ----------------------------------------------------------------------------------------------


def notebook_02() -> List[nbformat.NotebookNode]:
    cells = [
        md(r"""
        # 02 · ∇-GFlowNet on the 2-D toy

        The whole method on a problem whose answer is known exactly: a small ε-network pretrained on
        a ring of 8 Gaussians is finetuned with the residual ∇-DB loss towards
        $p^*(x_0) \propto p^\sharp(x_0)\,R(x_0)^\beta$ (a Gaussian bump reward), and compared with the
        closed-form target at every stage. Everything runs through `toy_2d.py` — `pretrain`,
        `finetune` (one `train_step` per update), `evaluate` — with its current defaults, except for a
        smaller number of updates so that the notebook runs in about a minute. The derivation behind
        each piece is in `01_derivation.ipynb`.
        """),
        code(SETUP, """
        import dataclasses
        import time

        import nabla_gfn as ng
        import toy_2d

        cfg = toy_2d.ToyConfig()               # toy_2d's current defaults
        torch.set_num_threads(cfg.threads)     # tiny MLPs run fastest on one thread
        UPDATES = min(cfg.updates, 150)        # fewer than toy_2d's default (cfg.updates) so the notebook stays short
        CHECKPOINTS = (0, UPDATES // 10, UPDATES // 3, UPDATES)
        run_cfg = dataclasses.replace(cfg, updates=UPDATES, eval_every=10)
        task = toy_2d.build_task(cfg)
        scheduler = toy_2d.sd_scheduler()
        schedule = ng.ddim_schedule(scheduler, cfg.num_steps)
        for name in ("prior", "reward", "beta", "num_steps", "batch_size", "fraction", "lr", "flow_lr", "gamma", "weighting", "updates"):
            print(f"{name:>10} = {getattr(run_cfg, name)!r}" + (f"   (toy_2d default {cfg.updates}; the README uses it)" if name == "updates" else ""))

        def scatter(ax, x, title, lim=4.5, color="C0"):   # plotting helper (presentation only)
            x = x.detach().numpy()
            if (np.abs(x) <= lim).all(1).mean() < 0.5:
                title += "\\n(most samples off the plot)"
            ax.scatter(x[:, 0], x[:, 1], s=1, alpha=0.3, color=color, rasterized=True)
            ax.set(xlim=(-lim, lim), ylim=(-lim, lim), aspect="equal", title=title, xticks=[], yticks=[])
        """),
        md(r"""
        ## 1 · Pretrain $P_F^\sharp$

        `toy_2d.pretrain` fits the ε-network (`TimeMLP`) by denoising score matching,
        $\mathbb E\,\|\epsilon - \hat\epsilon(\sqrt{\bar\alpha_\tau}x_0 + \sqrt{1-\bar\alpha_\tau}\,\epsilon, \tau)\|^2$, on
        samples of the prior, and caches it under `$NABLA_GFN_CACHE` (default `~/.cache/nabla-gfn`),
        keyed by its settings: only the first run pays. Frozen, it is $P_F^\sharp$; the finetuned
        policy $P_F^\theta$ starts as an exact copy. The pretrained sampler is checked against the
        prior it learned: mode weights should all be near 1/8.
        """),
        code("""
        start = time.time()
        reference = toy_2d.pretrain(cfg, task.prior, scheduler, quiet=True)
        print(f"pretrained ε̂♯ ready in {time.time() - start:.1f} s ({cfg.pretrain_iters} iterations × {cfg.pretrain_batch} samples, or loaded from the cache)")

        gen = torch.Generator().manual_seed(0)
        pretrained = toy_2d.sample(toy_2d.as_eps_fn(reference), schedule, 2000, gen).final
        weights = toy_2d.mode_weights(pretrained, task.prior.means)
        print(f"mode-weight TV of the pretrained sampler to the prior it learned: {0.5 * float((weights - task.prior.weights).abs().sum()):.3f}")

        fig, axes = plt.subplots(1, 3, figsize=(10, 3.3))
        scatter(axes[0], task.prior.sample(2000, gen), "prior p♯ (exact samples)", color="C2")
        scatter(axes[1], pretrained, f"pretrained P_F♯\\n({cfg.num_steps} DDIM(η=1) steps)")
        modes = np.arange(len(weights))
        axes[2].bar(modes - 0.2, task.prior.weights, 0.4, label="prior"), axes[2].bar(modes + 0.2, weights, 0.4, label="pretrained")
        axes[2].set(xlabel="mode (angle k·45°)", title="mode weights", ylim=(0, 0.2)), axes[2].legend(ncol=2)
        plt.show()
        """),
        md(r"""
        ## 2 · Finetune

        One update (`toy_2d.train_step`) is the paper's Algorithm 1 on one batch:

        1. sample `batch_size` trajectories with the current policy, no gradients
           (`ng.sample_trajectory`), recording every state and $\hat\epsilon_{\text{old}}$;
        2. keep the terminal transition of each and about `fraction` of the others, one per equal chunk
           of the chain (`ng.subsample_steps`, `ng.gather_transitions`);
        3. the residual ∇-DB loss on those transitions (`ng.nabla_db_loss`): forward, reverse and
           terminal terms, with the forward-looking guess + $g_\phi$ as the flow;
        4. one AdamW step, gradient norms clipped separately for the policy and for $g_\phi$.

        $g_\phi$ is `toy_2d.make_flow(cfg)`: a `TimeMLP` whose output layer is zeroed, so training
        starts exactly at the forward-looking guess. `toy_2d.finetune` runs the updates and, every
        `eval_every` updates, measures the mode-weight TV to the exact target on 1000 fresh samples.
        """),
        code("""
        start = time.time()
        policy, flow, history = toy_2d.finetune(run_cfg, task, reference, schedule, quiet=True)
        print(f"{UPDATES} updates in {time.time() - start:.0f} s")
        oracle = toy_2d.sample_oracle(task, reference, schedule, 2000, torch.Generator().manual_seed(1))
        oracle_metrics = toy_2d.metrics(task, oracle)

        evals = [h for h in history if "eval_mode_tv" in h]
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.5))
        for key in ("forward", "forward_flow", "reverse", "terminal"):
            axes[0].plot([h["update"] for h in history], [max(h[key], 1e-12) for h in history], label=key, lw=0.8)
        axes[0].set(yscale="log", xlabel="update", title=f"loss parts (weighting {cfg.weighting!r})"), axes[0].legend()
        axes[1].plot([h["update"] for h in evals], [h["eval_mode_tv"] for h in evals], "o-", ms=3, label="finetuned")
        axes[1].axhline(toy_2d.metrics(task, pretrained)["mode_tv"], ls="--", c="gray", label="pretrained")
        axes[1].axhline(oracle_metrics["mode_tv"], ls=":", c="k", label="oracle (exact flow)")
        axes[1].set(xlabel="update", title="mode-weight TV to the exact target"), axes[1].legend()
        axes[2].plot([h["update"] for h in evals], [h["eval_mean_log_reward"] for h in evals], "o-", ms=3, label="finetuned")
        axes[2].axhline(evals[0]["eval_exact_mean_log_reward"], ls=":", c="k", label="exact E_p*[r]")
        axes[2].set(xlabel="update", title="mean log-reward of the samples"), axes[2].legend()
        plt.show()
        """),
        md(r"""
        ## 3 · Watch the samples move

        `toy_2d.finetune` is deterministic given the seed, so a run of $n$ updates is exactly the
        first $n$ updates of a longer one (checked below on the losses): the checkpoints are short
        reruns. Each checkpoint samples from the *same* noise, so a point moves only because the policy
        changed. The target keeps every mode, reweighted — the finetuned samples should too.
        """),
        code("""
        snapshots = {0: reference}
        for n in CHECKPOINTS[1:-1]:
            snapshot, _, prefix = toy_2d.finetune(dataclasses.replace(run_cfg, updates=n), task, reference, schedule, quiet=True)
            assert [h["loss"] for h in prefix] == [h["loss"] for h in history[:n]], "a shorter run should be the start of the long one"
            snapshots[n] = snapshot
        snapshots[UPDATES] = policy
        at = {n: toy_2d.sample(toy_2d.as_eps_fn(net), schedule, 2000, torch.Generator().manual_seed(7)).final for n, net in snapshots.items()}
        exact = task.target.sample(2000, torch.Generator().manual_seed(8))

        fig, axes = plt.subplots(1, len(at) + 2, figsize=(2.9 * (len(at) + 2), 3.3))
        scatter(axes[0], exact, "exact target p*", color="C3")
        for ax, (n, x) in zip(axes[1:], at.items()):
            scatter(ax, x, f"after {n} updates\\nmode TV {toy_2d.metrics(task, x)['mode_tv']:.3f}")
        scatter(axes[-1], oracle, f"oracle (exact flow)\\nmode TV {oracle_metrics['mode_tv']:.3f}", color="C2")
        plt.show()

        fig, ax = plt.subplots(figsize=(6, 3))
        modes = np.arange(len(task.target.weights))
        ax.plot(modes, task.target.weights, "k-", lw=3, alpha=0.4, label="exact target")
        for n, x in at.items():
            ax.plot(modes, toy_2d.mode_weights(x, task.target.means), "o-", ms=3, label=f"{n} updates")
        ax.set(xlabel="mode (angle k·45°; the reward is centred on mode 0)", ylabel="weight", title="mode weights along training")
        ax.legend(ncol=2)
        plt.show()
        """),
        md(r"""
        ## 4 · Final metrics, and the learned flow against the exact one

        `toy_2d.evaluate` samples the finetuned, pretrained and oracle samplers and the exact target,
        and measures each against the target: mode-weight TV, mean log-reward (vs its exact
        expectation under $p^*$) and a sliced Wasserstein-1 distance. It also compares the flow the
        model *uses*, guess + $g_\phi$, with the exact $\nabla\log\tilde F$ at every step, on the finetuned
        policy's own states (the guess alone is shown for reference; 1 = no better than a zero flow).
        The two scatter plots show the same at two steps coordinate by coordinate: on the diagonal
        is exact; a cloud flatter than the diagonal is a flow that is too weak.
        """),
        code("""
        result, samples = toy_2d.evaluate(run_cfg, task, reference, policy, flow, schedule)
        print(f"{'':>22} {'mode TV':>8} {'mean r':>8} {'sliced W1':>10}")
        for key in ("pretrained", "finetuned", "oracle", "exact_target_samples"):
            m = result[key]
            print(f"{key:>22} {m['mode_tv']:8.3f} {m['mean_log_reward']:8.3f} {m['sliced_w1']:10.3f}")
        print(f"exact E_p*[r] = {result['finetuned']['exact_mean_log_reward']:.3f}")

        err = result["flow_relative_error"]
        fig, axes = plt.subplots(1, 3, figsize=(14, 4), gridspec_kw={"width_ratios": [1.4, 1, 1]})
        axes[0].plot(err["guess"], label=f"guess βγ∇r(x̂₀) alone (γ = {cfg.gamma})")
        axes[0].plot(err["guess_plus_flow"], label="guess + g_φ (what the loss uses)")
        axes[0].axhline(1.0, ls=":", c="gray", label="zero flow")
        axes[0].set(yscale="log", xlabel="step (0 = noise)", title="‖learned − exact ∇log F̃‖ / ‖exact‖"), axes[0].legend()

        states = toy_2d.sample(toy_2d.as_eps_fn(policy), schedule, 400, torch.Generator().manual_seed(9)).states
        for ax, i in zip(axes[1:], (cfg.num_steps // 3, 2 * cfg.num_steps // 3)):
            x, n = states[:, i], len(states)
            t, a = schedule.timesteps[i].expand(n), schedule.alpha_bar[i].expand(n)
            guess, _ = ng.forward_looking_score(toy_2d.as_eps_fn(policy), task.log_reward, x, t, a, torch.arange(n), cfg.beta, cfg.gamma)
            with torch.no_grad():
                learned = guess + flow(x, t)
            exact_flow = toy_2d.exact_flow_score(task.prior, task.target, x, a)
            ax.scatter(exact_flow.flatten(), guess.flatten(), s=2, alpha=0.4, label="guess alone")
            ax.scatter(exact_flow.flatten(), learned.flatten(), s=2, alpha=0.4, label="guess + g_φ")
            lim = float(exact_flow.abs().max()) * 1.1
            ax.plot([-lim, lim], [-lim, lim], "k:", lw=1, label="exact")
            ax.set(xlim=(-lim, lim), ylim=(-lim, lim), aspect="equal", xlabel="exact ∇log F̃ (both coordinates)",
                   title=f"step {i} (ᾱ = {float(a[0]):.2f}): learned vs exact")
            ax.legend(loc="upper left", markerscale=4)
        plt.show()
        """),
    ]
    if (ROOT / "toy_baselines.py").is_file() and (ROOT / "compare_toy.py").is_file():
        cells += baseline_cells()
    else:
        cells.append(md(r"""
        ## 5 · Baselines

        The baselines (DRaFT, ReFL, DDPO, RTB) are being added in `toy_baselines.py` and compared by
        `compare_toy.py`; this section will step through them once they land.
        """))
    return cells


def baseline_cells() -> List[nbformat.NotebookNode]:
    return [
        md(r"""
        ## 5 · Against the baselines: reward versus diversity

        `toy_baselines.py` adds four finetuning methods that share everything with ∇-GFlowNet here —
        the sampler, the frozen $P_F^\sharp$, the starting copy, one batch of fresh trajectories per
        update, the learning rate — and plug into `toy_2d.finetune` by name:

        - **DRaFT-K**: backpropagate $\beta r(x_0)$ through the last K sampling steps and ascend it;
        - **ReFL**: stop at a random late step, predict $\hat x_0$ in one call, ascend $\beta r(\hat x_0)$;
        - **DDPO**: PPO-clip on the per-step log-probability ratios, advantage $\beta r(x_0)$ normalised;
        - **RTB** (relative trajectory balance): $(\log Z + \sum\log P_F^\theta - \sum\log P_F^\sharp - \beta r(x_0))^2$, no reward gradient;
        - **∇-GFlowNet without $g_\phi$** ("no flow"): the forward term with the guess alone.

        Only ∇-GFlowNet and RTB have $p^*$ as their optimum. DRaFT, ReFL and DDPO maximise the reward
        and, with nothing tying them to the prior, drift towards its maximum. Same budget for all:
        the updates above, one seed. (`python compare_toy.py --readme` runs toy_2d's default budget on
        3 seeds for the README's table.)
        """),
        code("""
        import compare_toy

        labels = {key: variant["label"] for key, variant in compare_toy.variants(cfg).items()}
        finals, histories = {"nabla-db": policy}, {"nabla-db": history}
        for method in ("no-flow", "rtb", "draft", "refl", "ddpo"):
            finals[method], _, histories[method] = toy_2d.finetune(dataclasses.replace(run_cfg, method=method), task, reference,
                                                                   schedule, quiet=True)
        seconds = {m: h[-1]["train_time_s"] for m, h in histories.items()}   # training only, evaluations excluded

        final_samples = {m: toy_2d.sample(toy_2d.as_eps_fn(net), schedule, 2000, torch.Generator().manual_seed(7)).final
                         for m, net in finals.items()}
        rows = {"exact target": (exact, "—"), "pretrained P_F♯": (at[0], "—"), "oracle (exact flow)": (oracle, "—")}
        rows.update({labels[m]: (x, f"{seconds[m]:.0f}") for m, x in final_samples.items()})
        summary = {}
        print(f"{'':>32} {'mode TV':>8} {'mean r':>7} {'mode entropy':>13} {'train s':>8}")
        for name, (x, secs) in rows.items():
            m = toy_2d.metrics(task, x)
            entropy = compare_toy.mode_entropy(toy_2d.mode_weights(x, task.target.means)) + 0.0  # + 0.0: no "-0.00"
            summary[name] = (m["mean_log_reward"], entropy, m["mode_tv"])
            print(f"{name:>32} {m['mode_tv']:8.3f} {m['mean_log_reward']:7.2f} {entropy:13.2f} {secs:>8}")
        """),
        code("""
        fig, axes = plt.subplots(1, len(final_samples) + 1, figsize=(2.6 * (len(final_samples) + 1), 3.1))
        scatter(axes[0], exact, "exact target p*", color="C3")
        for ax, (m, x) in zip(axes[1:], final_samples.items()):
            scatter(ax, x, labels[m].replace(" (", "\\n(") + f"\\nmode TV {summary[labels[m]][2]:.3f}")
        plt.show()

        fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
        modes = np.arange(len(task.target.weights))
        axes[0].plot(modes, task.target.weights, "k-", lw=3, alpha=0.4, label="exact target")
        for m, x in final_samples.items():
            axes[0].plot(modes, toy_2d.mode_weights(x, task.target.means), "o-" if m.startswith(("nabla", "no-flow", "rtb")) else "s--",
                         ms=3, label=labels[m])
        axes[0].set(xlabel="mode (angle k·45°; reward centred on mode 0)", ylabel="weight", title="where the samples go")
        axes[0].legend(fontsize=7)
        for m, h in histories.items():
            evals = [e for e in h if "eval_mode_tv" in e]
            axes[1].plot([e["update"] for e in evals], [e["eval_mode_tv"] for e in evals], label=labels[m])
        axes[1].axhline(oracle_metrics["mode_tv"], ls=":", c="k", label="oracle")
        axes[1].set(xlabel="update", title="mode-weight TV to the exact target")
        left = summary["pretrained P_F♯"][0] - 1.0          # runs far below the pretrained reward are drawn at the edge
        for name, (reward, entropy, _) in summary.items():
            marker = "*" if name == "exact target" else ("D" if name in ("pretrained P_F♯", "oracle (exact flow)") else "o")
            label = name if reward >= left else f"{name} (r = {reward:.3g}, off scale)"
            marker = marker if reward >= left else "<"
            axes[2].scatter(max(reward, left), entropy, marker=marker, s=80 if marker == "*" else 30, c="k" if marker in "*D" else None)
            axes[2].annotate(label, (max(reward, left), entropy), fontsize=7, xytext=(4, 3), textcoords="offset points")
        axes[2].set(xlabel="mean log-reward →", ylabel="mode entropy (nats) — diversity", title="reward vs diversity",
                    xlim=(left - 0.1, 0.6))
        plt.show()
        for name, (reward, _, _) in summary.items():
            if reward < left:
                print(f"{name}: mean log-reward {reward:.3g} — its samples left the plotted region; the run became unstable at lr = {cfg.lr}")
        """),
        md(r"""
        How to read it: the target is not the reward's maximum — it keeps every mode, with the reward
        deciding their weights. The reward maximisers (dashed) pile onto the mode under the reward's
        centre: the highest mean log-reward, the mode entropy collapsing towards zero, the TV to the
        target growing. The methods whose optimum is $p^*$ aim at the black star instead: a higher
        reward than the pretrained model at the entropy of the target. How close each one gets in this
        budget, and at what cost per update, is in the table above; the README's table has three seeds
        and toy_2d's full budget.
        """),
    ]


# ----------------------------------------------------------------------------------------------
# 03 — the Stable Diffusion rung, piece by piece, on the tiny pipeline
# ----------------------------------------------------------------------------------------------


def notebook_03() -> List[nbformat.NotebookNode]:
    return [
        md(r"""
        # 03 · The Stable Diffusion rung, piece by piece

        `sd_finetune.py` finetunes Stable Diffusion v1.5 with a LoRA and the same `nabla_gfn` loss as
        the toy. This notebook takes its pieces apart on `--model tiny`: a randomly initialised
        pipeline with SD's component classes and scheduler config (and a tiny random CLIP and aesthetic
        head for the reward), built once under `$NABLA_GFN_CACHE` with no download. Its images are
        noise — what it shows is the wiring, the shapes and where the gradients go. The commands for
        a real run on a GPU are at the end.
        """),
        code(SETUP, """
        import dataclasses
        import tempfile

        import accelerate
        import diffusers
        import nabla_gfn as ng
        import sd_finetune as sd

        torch.set_num_threads(1)                        # the tiny models run fastest on one thread
        import transformers

        diffusers.utils.logging.disable_progress_bar()   # as sd_finetune.main does: no weight-loading bars
        transformers.utils.logging.disable_progress_bar()
        cfg = sd.parse_config(["--preset", "smoke", "--steps", "10"])   # the smoke preset, 10 steps for a longer strip
        paper = sd.parse_config([])
        print("smoke preset vs the paper's defaults:")
        for f in dataclasses.fields(cfg):
            if getattr(cfg, f.name) != getattr(paper, f.name) and f.name != "out":
                print(f"  {f.name:>24}: {getattr(cfg, f.name)!r:<12} (paper {getattr(paper, f.name)!r})")
        """),
        md(r"""
        ## 1 · Loading: the pipeline, the policy, the flow and the reward

        `sd.load_models` loads the pipeline with `StableDiffusionPipeline.from_pretrained` (frozen; a
        DDIM scheduler of its config), adds the LoRA (`peft.LoraConfig` + `unet.add_adapter`, rank 8
        on `to_q, to_k, to_v, to_out.0`, Gaussian init: $B = 0$), builds $g_\phi$ (a small conditional
        UNet over latents with a zeroed output layer) and the reward (aesthetic MLP on CLIP image
        embeddings, float32, differentiable).
        """),
        code("""
        device = torch.device("cpu")
        torch.manual_seed(cfg.seed)                       # the LoRA's Gaussian init and g_φ's, as in sd.run
        models = sd.load_models(cfg, device, sd.weight_dtype(cfg.precision, device))
        count = lambda params: sum(p.numel() for p in params)
        print(f"UNet {count(models.unet.parameters()):,} parameters, of which LoRA {count(sd.lora_parameters(models.unet)):,} trainable "
              f"in {len(sd.lora_layers(models.unet))} adapted layers")
        print(f"g_φ  {count(models.flow.parameters()):,} parameters; its output layer is zero: {bool((models.flow.conv_out.weight == 0).all())}")
        print(f"VAE  {count(models.pipe.vae.parameters()):,}, text encoder {count(models.pipe.text_encoder.parameters()):,}, "
              f"reward {type(models.reward).__name__} on CLIP {count(models.embedder.parameters()):,}")
        schedule = ng.ddim_schedule(models.pipe.scheduler, cfg.steps)
        print("timesteps τ:", schedule.timesteps.tolist())
        print("σ_τ:        ", [round(s, 3) for s in schedule.sigma.tolist()])
        """),
        md(r"""
        ## 2 · $P_F^\theta$ is the UNet with its LoRA; $P_F^\sharp$ is the same UNet with the adapters off

        No second copy of the UNet: `sd.guided_eps(..., lora=False)` runs it inside
        `sd.lora_disabled`, which switches the adapters off and back on. Both apply classifier-free
        guidance, $\hat\epsilon = \epsilon_u + w(\epsilon_c - \epsilon_u)$, with the empty negative
        prompt. `sd.loss_callables` returns the four callables `nabla_gfn` takes — policy ε, reference
        ε, log-reward of latents, $g_\phi$ — each routed by the row's trajectory index `traj`, so every
        row is scored with its own prompt. At initialisation $B = 0$, so the two policies agree exactly.
        """),
        code("""
        prompts = list(sd.ANIMALS[:4])
        cond = sd.encode_prompts(models.pipe, prompts)              # (4, 77, 32) text embeddings
        policy_eps, reference_eps, log_reward, flow = sd.loss_callables(models, cond, prompts, cfg.guidance_scale)

        gen = torch.Generator().manual_seed(cfg.seed)
        x = torch.randn(sd.latent_shape(models, len(prompts), cfg.resolution), generator=gen)
        t, traj = schedule.timesteps[3].expand(len(prompts)), torch.arange(len(prompts))
        with torch.no_grad():
            gap = (policy_eps(x, t, traj) - reference_eps(x, t, traj)).abs().max()
        print(f"latents {tuple(x.shape)}; at initialisation max |ε̂_θ − ε̂♯| = {float(gap):.1e}")
        """),
        md(r"""
        ## 3 · One trajectory

        `sd.sample_trajectories` runs `ng.sample_trajectory` (DDIM with $\eta = 1$, the Gaussian policy
        of `01_derivation.ipynb`) on latents, recording every state and $\hat\epsilon_{\text{old}}$. Below:
        each state of one trajectory decoded by the VAE, and its one-step clean prediction
        $\hat x_0(x_\tau)$. (Random weights: the images are noise, not a cat.)
        """),
        code("""
        trajectory = sd.sample_trajectories(models, schedule, cond, cfg, gen)
        print(f"states {tuple(trajectory.states.shape)} (trajectories, T+1, latent), ε̂_old {tuple(trajectory.eps.shape)}")

        with torch.no_grad():
            states = trajectory.states[0]                                       # (T+1, 4, h, w)
            x0_hat = ng.x0_prediction(states[:-1], trajectory.eps[0], schedule.alpha_bar)
            rows = [sd.decode_latents(models.pipe.vae, states), sd.decode_latents(models.pipe.vae, torch.cat([x0_hat, states[-1:]]))]
        fig, axes = plt.subplots(2, cfg.steps + 1, figsize=(1.2 * (cfg.steps + 1), 2.8))
        for r, (images, name) in enumerate(zip(rows, ("x_τ", "x̂₀(x_τ)"))):
            for k, ax in enumerate(axes[r]):
                ax.imshow(((images[k].permute(1, 2, 0) + 1) / 2).clamp(0, 1).numpy())
                ax.set(xticks=[], yticks=[])
                if r == 0:
                    ax.set_title(f"τ={int(schedule.timesteps[k])}" if k < cfg.steps else "x_0", fontsize=7)
            axes[r, 0].set_ylabel(name)
        plt.show()
        """),
        md(r"""
        ## 4 · The reward gradient through the VAE and the reward model

        The loss needs $\nabla r$ with respect to the *latent*: `sd.latent_log_reward` decodes with the
        VAE, then CLIP-embeds (resize, normalise — plain torch, differentiable) and applies the
        aesthetic MLP. `ng.reward_gradient` builds that graph, takes the gradient and frees it at
        once. The reward and its gradient run in float32 (the authors found bf16 gives large errors).

        **Check:** the gradient against a central finite difference along a random direction.
        Then the forward-looking guess $\beta\gamma_\tau\nabla_x r(\hat x_0(x))$ at a noisy state, whose
        gradient also runs back through the UNet.
        """),
        code("""
        x0 = trajectory.final
        grad, r = ng.reward_gradient(log_reward, x0, traj)
        print(f"r(x_0) = {r.numpy().round(4)};  ∇r has shape {tuple(grad.shape)} (the latent's)")
        h = 1e-2
        for name, direction in (("along ∇r", grad), ("random", torch.randn(x0.shape, generator=gen))):
            direction = direction / direction.flatten(1).norm(dim=1)[:, None, None, None]
            with torch.no_grad():
                finite_diff = (log_reward(x0 + h * direction, traj) - log_reward(x0 - h * direction, traj)) / (2 * h)
            analytic = (grad * direction).flatten(1).sum(1)
            show = lambda v: np.array2string(v.numpy(), formatter={"float_kind": "{:+.3e}".format})
            print(f"directional derivative {name:>8}: autograd {show(analytic)}, finite difference {show(finite_diff)}")

        i = cfg.steps // 2
        x_mid = trajectory.states[:, i]
        guess, r_hat = ng.forward_looking_score(policy_eps, log_reward, x_mid, schedule.timesteps[i].expand(len(prompts)),
                                                schedule.alpha_bar[i].expand(len(prompts)), traj, cfg.beta, cfg.gamma)
        print(f"step {i}: forward-looking guess β·γ·∇r(x̂_0), β = {cfg.beta:g}, γ = {cfg.gamma}: norms {guess.flatten(1).norm(dim=1).numpy().round(3)}")
        """),
        md(r"""
        ## 5 · One ∇-DB update

        The training step of `sd.train_epoch`, written out once: subsample the transitions (the
        terminal one of each trajectory plus ~10% of the others), evaluate `ng.nabla_db_loss` with the
        four callables, backpropagate, then `sd.optimizer_step` (gradients averaged over processes,
        norms clipped separately for the LoRA and for $g_\phi$, **one** AdamW step — the official code
        takes two). Gradients reach the LoRA and $g_\phi$ only; the UNet's own weights are frozen.
        """),
        code("""
        steps = ng.subsample_steps(cfg.steps, cfg.subsample_fraction, len(prompts), gen)
        batch = ng.gather_transitions(trajectory, schedule, steps)
        print(f"trained steps per trajectory: {steps.tolist()} → {len(batch)} transitions")

        optimizer = sd.make_optimizer(models, cfg)
        loss, parts = ng.nabla_db_loss(batch, policy_eps, reference_eps, log_reward, flow, cfg.loss_config())
        loss.backward()
        print("loss parts:", {k: f"{float(v):.3g}" for k, v in parts.items()})
        frozen = [p for p in models.unet.parameters() if not p.requires_grad]
        print(f"gradients: LoRA {sum(p.grad is not None for p in sd.lora_parameters(models.unet))}/{len(sd.lora_parameters(models.unet))} tensors, "
              f"g_φ {sum(p.grad is not None for p in models.flow.parameters())}/{len(list(models.flow.parameters()))}, "
              f"frozen UNet weights {sum(p.grad is not None for p in frozen)}/{len(frozen)}")

        accelerator = accelerate.Accelerator(cpu=True)
        print("pre-clipping gradient norms:", sd.optimizer_step(optimizer, models, cfg, accelerator))
        with torch.no_grad():
            gap = (policy_eps(batch.x, batch.t, batch.traj) - reference_eps(batch.x, batch.t, batch.traj)).abs().max()
        _, after = ng.nabla_db_loss(batch, policy_eps, reference_eps, log_reward, flow, cfg.loss_config())
        print(f"after the update: max |ε̂_θ − ε̂♯| = {float(gap):.2e}; trust-region term λ‖ε̂_θ − ε̂_old‖² = {float(after['trust_region']):.3g}")
        """),
        md(r"""
        ## 6 · Save the LoRA, load it with `pipe.load_lora_weights`

        `sd.save_checkpoint` writes the LoRA in diffusers' format (plus $g_\phi$, the optimiser and the
        RNG states, for `--resume`). Any diffusers pipeline of the same base model loads it with
        `pipe.load_lora_weights(folder)`; the loaded UNet reproduces the finetuned one.
        """),
        code("""
        pipe = sd.load_pipeline(cfg, torch.float32)          # a fresh copy of the pretrained pipeline
        with tempfile.TemporaryDirectory() as folder:
            checkpoint = Path(folder) / "epoch_0001"
            sd.save_checkpoint(checkpoint, models, optimizer, [gen], epoch=1, update=1, accelerator=accelerator)
            print("checkpoint:", sorted(p.name for p in checkpoint.iterdir()))
            with sd.quiet_library_logs():                    # (silences "no LoRA keys for the text encoder")
                pipe.load_lora_weights(checkpoint)
        with torch.no_grad():
            loaded = pipe.unet(batch.x, batch.t, encoder_hidden_states=cond[batch.traj]).sample
            finetuned = models.unet(batch.x, batch.t, encoder_hidden_states=cond[batch.traj]).sample
        print(f"max |loaded UNet − finetuned UNet| = {float((loaded - finetuned).abs().max()):.1e}")
        image = pipe(prompts[0], guidance_scale=cfg.guidance_scale, eta=1.0, num_inference_steps=cfg.steps,
                     height=cfg.resolution, width=cfg.resolution, generator=torch.Generator().manual_seed(0)).images[0]
        print(f"pipe({prompts[0]!r}) → {image.size} image (noise: random tiny weights)")
        """),
        md(r"""
        ## 7 · The real run

        The loop above, repeated: `sd.run` samples 64 trajectories per epoch (prompts drawn from 45
        simple animals), trains on their subsampled transitions in updates of 64, checkpoints, writes
        sample grids and metrics. Defaults are the paper's aesthetic-reward run (SD v1.5, 50 DDIM(η=1)
        steps, guidance 5, 512², LoRA rank 8, β = 1e4, λ = 2e3, ~200 updates); the frozen weights run
        in bf16 on a GPU, the LoRA, $g_\phi$ and the reward in float32.

        ```bash
        # CPU smoke run (tiny pipeline, seconds)
        python sd_finetune.py --preset smoke --eval --out runs/smoke

        # one GPU; downloads SD v1.5, CLIP ViT-L/14 and the aesthetic MLP on first use
        python sd_finetune.py --reward aesthetic --out runs/aesthetic
        python sd_finetune.py --reward aesthetic --no-flow --out runs/aesthetic-noflow   # the "no flow" variant
        python sd_finetune.py --resume runs/aesthetic --eval                              # evaluate the last checkpoint

        # N GPUs
        accelerate launch --multi_gpu --num_processes 8 sd_finetune.py --reward aesthetic --out runs/aesthetic-8gpu

        # offline, with local copies of the three inputs
        export HF_HUB_OFFLINE=1 NABLA_GFN_MODEL=/data/sd15 NABLA_GFN_CLIP=/data/clip-l14 \
               NABLA_GFN_AESTHETIC_HEAD=/data/sac+logos+ava1-l14-linearMSE.pth
        python sd_finetune.py --out runs/aesthetic
        ```

        If memory runs out, lower `--train-batch-size` and `--sample-batch-size` (gradient
        accumulation keeps 64 transitions per update). Every flag: `python sd_finetune.py --help`.

        **Use the result** — the LoRA of the last epoch (34 epochs × 6 updates by default):

        ```python
        from diffusers import DDIMScheduler, StableDiffusionPipeline
        pipe = StableDiffusionPipeline.from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5").to("cuda")
        pipe.load_lora_weights("runs/aesthetic/checkpoints/epoch_0034")
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)   # the sampler it was trained for
        image = pipe("cat", guidance_scale=5.0, eta=1.0, num_inference_steps=50).images[0]
        ```
        """),
    ]


# ----------------------------------------------------------------------------------------------
# 04 — the 8×8-digits rung, step by step
# ----------------------------------------------------------------------------------------------


def notebook_04() -> List[nbformat.NotebookNode]:
    return [
        md(r"""
        # 04 · ∇-GFlowNet on the 8×8 digits

        The middle rung between the 2-D toy and Stable Diffusion: a small diffusion model pretrained
        on scikit-learn's 1,797 8×8 handwritten digits (no download), with Stable Diffusion's DDIM
        schedule, finetuned towards $p^*(x) \propto p^\sharp(x)\,R(x)^\beta$ with the reward
        `class:K`, $r(x) = \log p(y=K\mid x)$ under a small digit classifier. With $\beta = 1$ the
        target is $p^\sharp(x)\,p(K\mid x) \propto p^\sharp(x\mid y=K)$: the pretrained model's own
        K's, with their variety — not one perfect K.

        Everything is `toy_digits.py` (and `nabla_gfn.py`, used unchanged): this notebook calls its
        functions with its own `Config`, and adds only narration, checks and plots. To keep it near a
        minute and a half on 2 CPU cores it uses smaller settings than the script's defaults (listed
        below), so its numbers are weaker than those in the README's digits section.
        """),
        code(SETUP, """
        import contextlib
        import dataclasses
        import io
        import time

        import nabla_gfn as ng
        import toy_digits as td

        cfg = td.Config()                      # toy_digits' current defaults
        SMALL = dict(pretrain_steps=800, classifier_steps=500, updates=150, reference_pool=2000,
                     eval_samples=256, curve_every=25, curve_samples=128)   # shorter, so the notebook stays short
        run_cfg = dataclasses.replace(cfg, **SMALL)
        td.validate(run_cfg)
        torch.set_num_threads(run_cfg.threads)  # small matrices run fastest on one thread
        _, K = td.parse_reward(run_cfg.reward)
        for name in ("reward", "beta", "num_steps", "batch", "subsample", "lora_rank", "lr", "gamma", "weighting", "reverse_weight", *SMALL):
            default = getattr(cfg, name)
            print(f"{name:>16} = {getattr(run_cfg, name)!r}" + (f"   (toy_digits default {default!r})" if getattr(run_cfg, name) != default else ""))

        cmap = plt.get_cmap("gray_r").copy()
        cmap.set_bad("white")

        def show(ax, x, title, cols=8):          # plotting helper (presentation only): a grid of digits, ink dark
            ax.imshow(td.image_grid(x, cols), cmap=cmap, vmin=-1, vmax=1, interpolation="nearest")
            ax.set_title(title)
            ax.axis("off")
        """),
        md(r"""
        ## 1 · Pretrain $P_F^\sharp$ and the classifier

        `load_or_pretrain_denoiser` trains the ε-prediction MLP (`DigitDenoiser`, a diffusers
        `ModelMixin` so that LoRA attaches as on the SD UNet) and `load_or_train_classifier` the digit
        classifier (temperature-scaled, so $p(K\mid x)$ is calibrated). Both are cached under
        `$NABLA_GFN_CACHE`, keyed by their settings: only the first run pays.
        """),
        code("""
        start = time.time()
        images, labels = td.load_digits_tensor()
        scheduler = td.make_scheduler()
        with contextlib.redirect_stderr(io.StringIO()):   # hide the first run's progress bars (presentation only)
            pretrained = td.load_or_pretrain_denoiser(run_cfg, images, scheduler)
            classifier, accuracy = td.load_or_train_classifier(run_cfg, images, labels)
        schedule = ng.ddim_schedule(scheduler, run_cfg.num_steps)
        print(f"denoiser and classifier ready in {time.time() - start:.0f} s (or loaded from the cache); "
              f"classifier held-out accuracy {accuracy:.3f}, temperature {float(classifier.temperature):.2f}")

        gen = torch.Generator().manual_seed(run_cfg.seed)
        pretrained_eps = td.policy_eps_fn(pretrained)
        x_pre = td.sample(pretrained_eps, schedule, 1000, gen)
        with torch.no_grad():
            counts = np.bincount(classifier(x_pre.clamp(-1, 1)).argmax(1).numpy(), minlength=10)
        print("classes the classifier sees in 1000 pretrained samples:", dict(enumerate(counts.tolist())))

        fig, axes = plt.subplots(1, 3, figsize=(12, 4), gridspec_kw={"width_ratios": [1, 1, 1.2]})
        show(axes[0], images[:64], "real digits")
        show(axes[1], x_pre[:64], f"pretrained p♯ ({run_cfg.pretrain_steps} steps)")
        axes[2].bar(range(10), counts / counts.sum(), color=["C3" if k == K else "C0" for k in range(10)])
        axes[2].set(xticks=range(10), xlabel="predicted class", title="class frequencies under p♯")
        plt.show()
        """),
        md(r"""
        ## 2 · The reward `class:K`

        `make_log_reward` gives $r(x) = \log\mathrm{softmax}(\text{logits}(\mathrm{clip}(x,-1,1)))_K$,
        differentiable in $x$ — ∇-GFlowNet needs only $\nabla_x r$. **Check:** on real digits, the
        mean reward is highest for the true class K; the gradient at a real digit shows which pixels
        would make it more of a K.
        """),
        code("""
        log_reward = td.make_log_reward(run_cfg.reward, classifier)
        r_real = td.score(log_reward, images)
        per_class = [float(r_real[labels == c].mean()) for c in range(10)]
        print("mean r on real digits, by true class:", " ".join(f"{c}:{v:.1f}" for c, v in enumerate(per_class)))
        assert int(np.argmax(per_class)) == K

        idx = [int((labels == c).nonzero()[0]) for c in (K, (K + 5) % 10)]
        x = images[idx].clone().requires_grad_(True)
        grad, = torch.autograd.grad(log_reward(x, torch.arange(len(x))).sum(), x)
        fig, axes = plt.subplots(1, 4, figsize=(10, 2.6))
        for j, i in enumerate(idx):
            axes[2 * j].imshow(images[i, 0], cmap="gray_r", vmin=-1, vmax=1)
            axes[2 * j].set_title(f"real {int(labels[i])}: p(K={K}|x) = {float(r_real[i].exp()):.2f}")
            g = grad[j, 0].numpy()
            axes[2 * j + 1].imshow(g, cmap="RdBu_r", vmin=-abs(g).max(), vmax=abs(g).max())
            axes[2 * j + 1].set_title("∇ₓ r (red: more ink)")
        for ax in axes:
            ax.axis("off")
        plt.show()
        """),
        md(r"""
        ## 3 · $P_F^\theta$ and $P_F^\sharp$ in one network; $g_\phi$

        `make_finetuner` copies the pretrained model, freezes it and attaches LoRA adapters (peft,
        `add_adapter`): the adapters on give $P_F^\theta$ (`policy_eps_fn`), the same network with
        them disabled gives $P_F^\sharp$ (`reference_eps_fn`). LoRA's B starts at zero and the flow
        correction $g_\phi$ (`FlowCorrection`) has a zero output layer, so at initialisation the
        policy *is* the reference and the flow is exactly the forward-looking guess. **Check** both.
        """),
        code("""
        ft = td.make_finetuner(run_cfg, pretrained, "nabla-db")
        n_lora = sum(p.numel() for p in ft.lora_params)
        n_all = sum(p.numel() for p in ft.model.parameters())
        print(f"LoRA rank {run_cfg.lora_rank}: {n_lora:,} trainable of {n_all:,} parameters; g_φ: {sum(p.numel() for p in ft.flow.parameters()):,}")

        x, t, traj = torch.randn(16, *td.IMAGE_SHAPE, generator=gen), torch.full((16,), 500), torch.arange(16)
        with torch.no_grad():
            eps_policy, eps_ref = td.policy_eps_fn(ft.model)(x, t, traj), td.reference_eps_fn(ft.model)(x, t, traj)
            print(f"at init: max |ε̂_θ − ε̂♯| = {float((eps_policy - eps_ref).abs().max()):.1e}, "
                  f"|ε̂♯ − pretrained| = {float((eps_ref - pretrained(x, t)).abs().max()):.1e}, max |g_φ| = {float(ft.flow(x, t, traj).abs().max()):.1e}")
        """),
        md(r"""
        ## 4 · One trajectory

        `nabla_gfn.sample_trajectory` runs DDIM(η = 1) from $x_T \sim \mathcal N(0, I)$ (step 0)
        to $x_0$ (step T) and keeps every state: the transitions $(x,\tau)\to(x',\tau')$ the loss is
        trained on (a `subsample` fraction per trajectory, plus the last one).
        """),
        code("""
        trajectory = ng.sample_trajectory(pretrained_eps, schedule, torch.randn(8, *td.IMAGE_SHAPE, generator=gen), gen)
        print("states", tuple(trajectory.states.shape), "(B, T+1, 1, 8, 8); ε̂ per step", tuple(trajectory.eps.shape))
        steps = np.linspace(0, run_cfg.num_steps, 6).round().astype(int)
        fig, axes = plt.subplots(1, len(steps), figsize=(12, 2.6))
        for ax, i in zip(axes, steps):
            show(ax, trajectory.states[:, i], f"step {i}" + (" (x_T)" if i == 0 else " (x_0)" if i == run_cfg.num_steps else f", ᾱ = {float(schedule.alpha_bar[i]):.2f}"), cols=2)
        plt.show()
        """),
        md(r"""
        ## 5 · The reference: $p^\sharp$ importance-reweighted by $R^\beta$

        The target can be estimated directly here: draw $M$ samples $x_i \sim p^\sharp$ and give
        them self-normalised weights $w_i \propto R(x_i)^\beta$ (`build_reference`). Kish's effective
        sample size $(\sum w)^2/\sum w^2$ says how many of the $M$ carry the estimate; every metric
        is computed for this weighted set as for samples (`evaluate`). Resampled, it is what a
        perfect finetune would draw.
        """),
        code("""
        reference = td.build_reference(td.sample(pretrained_eps, schedule, run_cfg.reference_pool, gen), log_reward, run_cfg.beta)
        print(f"reference: M = {run_cfg.reference_pool}, ESS = {reference.ess:.0f} ({reference.ess / run_cfg.reference_pool:.0%}); "
              f"weights sum to {float(reference.weights.sum()):.6f}")
        reference_gaussian = td.weighted_gaussian(classifier.features(reference.samples.clamp(-1, 1)), reference.weights)
        eval_metrics = lambda x, **kw: td.evaluate(x, classifier, log_reward, images, K, reference_gaussian, **kw)
        metrics = {"reference": eval_metrics(reference.samples, weights=reference.weights, n=run_cfg.eval_samples)}
        reference_draw = reference.resample(run_cfg.eval_samples, gen)
        pretrained_samples = td.sample(pretrained_eps, schedule, run_cfg.eval_samples, gen)
        metrics["pretrained"] = eval_metrics(pretrained_samples)
        print(f"Fréchet floor (a {run_cfg.eval_samples}-sample draw of the reference itself): {eval_metrics(reference_draw)['frechet_to_reference']:.3f}")

        fig, axes = plt.subplots(1, 3, figsize=(12, 4), gridspec_kw={"width_ratios": [1.2, 1, 1]})
        axes[0].hist(np.log10(reference.weights.numpy() * run_cfg.reference_pool), bins=50)
        axes[0].set(xlabel="log₁₀(M · w_i)", ylabel="samples", title="importance weights (uniform = 0)")
        show(axes[1], reference.samples[reference.weights.argsort(descending=True)[:64]], "the 64 heaviest pool samples")
        show(axes[2], reference_draw[:64], f"reference resampled (ESS {reference.ess:.0f})")
        plt.show()
        """),
        md(r"""
        ## 6 · A short ∇-GFlowNet finetune

        `finetune` runs `nabla_db_update` `updates` times: sample a batch of trajectories with the
        current policy, gather the subsampled transitions, take one step on
        `nabla_gfn.nabla_db_loss` (residual ∇-DB with the forward-looking flow; the LoRA and $g_\phi$
        each clipped), and every `curve_every` updates measure 128 samples drawn from fixed noise.
        """),
        code("""
        def curve_metrics(model):
            # fixed noise for every point, so the curves move only with the model
            x = td.sample(td.policy_eps_fn(model), schedule, run_cfg.curve_samples, torch.Generator().manual_seed(run_cfg.seed + 1))
            return eval_metrics(x)

        start = time.time()
        ft, history = td.finetune(run_cfg, "nabla-db", pretrained, schedule, log_reward, curve_metrics, progress=False)
        print(f"{run_cfg.updates} updates × {run_cfg.batch} trajectories in {time.time() - start:.0f} s")
        finetuned = td.sample(td.policy_eps_fn(ft.model), schedule, run_cfg.eval_samples, torch.Generator().manual_seed(run_cfg.seed + 2))
        metrics["∇-GFlowNet"] = eval_metrics(finetuned)

        with torch.no_grad():
            print(f"after finetuning: max |ε̂_θ − ε̂♯| = {float((td.policy_eps_fn(ft.model)(x, t, traj) - td.reference_eps_fn(ft.model)(x, t, traj)).abs().max()):.2f}, "
                  f"max |g_φ| = {float(ft.flow(x, t, traj).abs().max()):.2f}; adapters off still give p♯: "
                  f"{float((td.reference_eps_fn(ft.model)(x, t, traj) - pretrained(x, t)).abs().max()):.1e}")
        """),
        md(r"""
        ## 7 · Pretrained, reference, finetuned

        "fraction classified as K" is the share of samples the classifier calls a K; diversity is
        the mean pairwise L2 distance between samples (and the number of distinct nearest training
        digits); Fréchet is measured in the classifier's feature space against the reference. The
        dashed line is the reference (the target), the dotted one the pretrained model.
        """),
        code("""
        fig, axes = plt.subplots(1, 5, figsize=(16, 3.6), gridspec_kw={"width_ratios": [1, 1, 1, 1.1, 1.1]})
        show(axes[0], pretrained_samples[:64], "pretrained p♯")
        show(axes[1], reference_draw[:64], "reference p♯·R^β")
        show(axes[2], finetuned[:64], f"∇-GFlowNet, {run_cfg.updates} updates")
        for ax, key, title in ((axes[3], "frac_class", f"fraction classified as {K}"), (axes[4], "diversity_l2", "diversity (mean pairwise L2)")):
            ax.plot([h["update"] for h in history], [h[key] for h in history], "o-", ms=3, label="∇-GFlowNet")
            ax.axhline(metrics["reference"][key], color="k", ls="--", lw=1, label="reference")
            ax.axhline(metrics["pretrained"][key], color="gray", ls=":", lw=1, label="pretrained")
            ax.set(xlabel="update", title=title)
        axes[3].legend()
        plt.show()
        """),
        md(r"""
        ## 8 · DRaFT-K for contrast

        DRaFT-K (`draft_update`) backpropagates $r(x_0)$ through the last K sampling steps and
        maximises $\mathbb E[r]$, with no term tying the model to $p^\sharp$: it is expected to push
        harder towards K and give up diversity (collapse onto the reward's maximum), where
        ∇-GFlowNet aims at the reweighted $p^\sharp$. Same settings and budget, its own learning rate.
        """),
        code("""
        start = time.time()
        ft_draft, history_draft = td.finetune(run_cfg, "draft", pretrained, schedule, log_reward, curve_metrics, progress=False)
        print(f"DRaFT-{run_cfg.draft_k}: {run_cfg.updates} updates in {time.time() - start:.0f} s")
        drafted = td.sample(td.policy_eps_fn(ft_draft.model), schedule, run_cfg.eval_samples, torch.Generator().manual_seed(run_cfg.seed + 2))
        metrics[f"DRaFT-{run_cfg.draft_k}"] = eval_metrics(drafted)

        keys = ["frac_class", "mean_reward", "diversity_l2", "distinct_nearest_digits", "frechet_to_reference"]
        print(f"{'':>12}" + "".join(f"{k:>25}" for k in keys))
        for name, m in metrics.items():
            print(f"{name:>12}" + "".join(f"{m[k]:>25.3f}" for k in keys))

        fig, axes = plt.subplots(1, 3, figsize=(12, 3.6), gridspec_kw={"width_ratios": [1, 1.1, 1.1]})
        show(axes[0], drafted[:64], f"DRaFT-{run_cfg.draft_k}, {run_cfg.updates} updates")
        for ax, key, title in ((axes[1], "frac_class", f"fraction classified as {K}"), (axes[2], "diversity_l2", "diversity (mean pairwise L2)")):
            for name, h in (("∇-GFlowNet", history), (f"DRaFT-{run_cfg.draft_k}", history_draft)):
                ax.plot([p["update"] for p in h], [p[key] for p in h], "o-", ms=3, label=name)
            ax.axhline(metrics["reference"][key], color="k", ls="--", lw=1, label="reference")
            ax.axhline(metrics["pretrained"][key], color="gray", ls=":", lw=1, label="pretrained")
            ax.set(xlabel="update", title=title)
        axes[1].legend()
        plt.show()
        """),
        md(r"""
        ## The full run

        The same steps with the script's defaults (2,500 pretraining steps, 500 updates, a 4,000-sample
        reference), writing config, metrics, sample arrays and a figure:

        ```bash
        python toy_digits.py                               # ∇-GFlowNet, reward class:3, β = 1
        python toy_digits.py --method nabla-db,draft       # with DRaFT-K on the same budget
        python toy_digits.py --preset ink                  # tilt towards thicker strokes, no classifier
        python toy_digits.py --preset paper                # the loss exactly as the paper sets it
        ```

        Every flag: `python toy_digits.py --help`. The `toy_digits.py` docstring lists the measured
        choices (MLP denoiser, calibrated classifier, `kl` weighting, γ = √ᾱ, w_B = 5) and the known
        shortfall: in the default budget ∇-GFlowNet covers about two thirds of the way from $p^\sharp$ to
        the target in the fraction of K's.
        """),
    ]


# ----------------------------------------------------------------------------------------------
# Build and execute
# ----------------------------------------------------------------------------------------------

NOTEBOOKS: Dict[str, Callable[[], List[nbformat.NotebookNode]]] = {
    "01_derivation.ipynb": notebook_01,
    "02_toy_2d.ipynb": notebook_02,
    "03_stable_diffusion.ipynb": notebook_03,
    "04_digits.ipynb": notebook_04,
}


def build(name: str) -> nbformat.NotebookNode:
    """The notebook `name` without outputs; cell ids are stable so that rebuilding gives no diff."""
    nb = nbformat.v4.new_notebook()
    nb.cells = NOTEBOOKS[name]()
    for i, cell in enumerate(nb.cells):
        cell.id = f"{name[:2]}-{i:02d}"
    nb.metadata = {"kernelspec": KERNEL, "language_info": {"name": "python"}}
    return nb


def execute(nb: nbformat.NotebookNode, timeout: int = 600, env: Optional[Dict[str, str]] = None) -> nbformat.NotebookNode:
    """Run every cell in a fresh `python3` kernel started in notebooks/ (no timing metadata).

    timeout: seconds per cell; env: the kernel's whole environment (default: this process's).
    Raises nbclient's CellExecutionError on the first cell that fails.
    """
    from nbclient import NotebookClient

    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", record_timing=False,
                            resources={"metadata": {"path": str(HERE)}})
    client.execute(**({} if env is None else {"env": env}))
    return nb


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("only", nargs="*", help="name prefixes of the notebooks to build (default: all)")
    parser.add_argument("--no-execute", action="store_true", help="write the cells without executing them")
    args = parser.parse_args(argv)
    names = [n for n in NOTEBOOKS if not args.only or any(n.startswith(p) for p in args.only)]
    if not names:
        raise SystemExit(f"error: no notebook starts with {args.only}; have {list(NOTEBOOKS)}")
    for name in names:
        nb = build(name)
        start = time.time()
        if not args.no_execute:
            execute(nb)
        nbformat.write(nb, HERE / name)
        print(f"{name}: {len(nb.cells)} cells" + ("" if args.no_execute else f", executed in {time.time() - start:.0f} s"))


if __name__ == "__main__":
    main()
