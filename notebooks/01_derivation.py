# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 01 · From detailed balance to residual ∇-DB to the forward-looking flow
#
# ∇-GFlowNet (Liu et al., ICLR 2025, [arXiv:2412.07775](https://arxiv.org/abs/2412.07775))
# finetunes a pretrained diffusion sampler towards the reward-tilted target
# $p^*(x_0) \propto p^\sharp(x_0)\,R(x_0)^\beta$ with a loss made only of *gradients*. This
# notebook builds that loss one idea at a time. Every equation is followed by a numerical check
# on the 2-D toy of `toy_2d.py` (a ring of 8 Gaussians, a Gaussian-bump reward), where the
# target, the noised marginals and the residual flow are all known in closed form.
#
# The math is not written here: every quantity comes from `nabla_gfn.py` (the algorithm) or
# `toy_2d.py` (exact Gaussian-mixture quantities). The notebook calls them, checks them and plots.
#
# **Time convention (diffusers).** A trajectory runs from noise $x_T$ (step 0) to the clean
# sample $x_0$ (step $T$). $x$ is the current, noisier state at timestep $\tau$; $x'$ the next,
# cleaner state at $\tau' < \tau$. The paper indexes the other way (its $x_0$ is the noise and
# its $x_t \to x_{t+1}$ is our $x \to x'$); equation numbers below refer to the paper.

# %%
import sys
from pathlib import Path

ROOT = next(p for p in (Path.cwd(), *Path.cwd().parents) if (p / "nabla_gfn.py").is_file())
sys.path.insert(0, str(ROOT))  # nabla_gfn.py, toy_2d.py, sd_finetune.py live in the repository root

import warnings

import matplotlib.pyplot as plt
import numpy as np
import torch

warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm's notebook bars want ipywidgets
# %matplotlib inline
plt.rcParams.update({"figure.dpi": 70, "font.size": 9, "axes.titlesize": 9, "legend.fontsize": 8})

import copy
import dataclasses

import gmm
import nabla_gfn as ng
import toy_2d
from experiments import toy_diagnostics  # the exact-flow oracle and flow errors of the toy

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


# %%
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
    """(ᾱ, ᾱ', σ) of step i, one per row: the schedule terms nabla_gfn's step functions take."""
    return [getattr(schedule, f)[i].expand(n) for f in ("alpha_bar", "alpha_bar_next", "sigma")]


# %% [markdown]
# ## 1 · The target
#
# The reward model gives $r(x_0) = \log R(x_0)$ and $\beta > 0$ scales it. The finetuned model
# should sample
#
# $$p^*(x_0) \;\propto\; p^\sharp(x_0)\,R(x_0)^\beta \;=\; p^\sharp(x_0)\,e^{\beta r(x_0)},$$
#
# the pretrained distribution *reweighted*, not collapsed onto the reward's maximum. For a
# Gaussian-mixture prior and a Gaussian (or linear) log-reward, $p^*$ is again a Gaussian
# mixture; `toy_2d` computes it in closed form (`GaussianReward.tilt`).
#
# **Check:** normalise $p^\sharp e^{\beta r}$ numerically on a grid and compare with the closed form.

# %%
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

# %% [markdown]
# ## 2 · The policy: one Gaussian denoising step
#
# The sampler is DDPM, i.e. DDIM with $\eta = 1$. From the noise prediction $\hat\epsilon(x,\tau)$:
#
# $$\hat x_0(x) = \frac{x - \sqrt{1-\bar\alpha_\tau}\,\hat\epsilon(x,\tau)}{\sqrt{\bar\alpha_\tau}},\qquad
# \mu(x) = \sqrt{\bar\alpha_{\tau'}}\,\hat x_0(x) + \sqrt{1-\bar\alpha_{\tau'}-\sigma_\tau^2}\;\hat\epsilon(x,\tau),\qquad
# \sigma_\tau^2 = \frac{1-\bar\alpha_{\tau'}}{1-\bar\alpha_\tau}\Big(1-\frac{\bar\alpha_\tau}{\bar\alpha_{\tau'}}\Big),$$
#
# $$P_F(x'\mid x) = \mathcal N\big(x';\,\mu(x),\,\sigma_\tau^2 I\big),\qquad
# \nabla_{x'}\log P_F(x'\mid x) = -\frac{x'-\mu(x)}{\sigma_\tau^2}.$$
#
# `ng.ddim_schedule` reads $\bar\alpha_\tau, \bar\alpha_{\tau'}, \sigma_\tau$ off the diffusers
# scheduler; `ng.x0_prediction` and `ng.step_mean` are the two formulas; `ng.sample_trajectory`
# runs the chain. $P_F^\sharp$ uses the pretrained $\hat\epsilon^\sharp$, $P_F^\theta$ the finetuned
# $\hat\epsilon_\theta$; both share $\sigma_\tau$.
#
# **Checks:** one of our steps equals `DDIMScheduler.step(eta=1)` given the same noise; the
# closed-form step score equals autograd of `ng.gaussian_log_prob`.

# %%
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

# %% [markdown]
# ## 3 · Detailed balance, divided: the residual flow
#
# A GFlowNet with the fixed noising process $P_B$ as its backward policy satisfies detailed
# balance with some flow $F$; so does the pretrained model with its own flow $F^\sharp$:
#
# $$F(x)\,P_F^\theta(x'\mid x) = F(x')\,P_B(x\mid x'),\qquad F^\sharp(x)\,P_F^\sharp(x'\mid x) = F^\sharp(x')\,P_B(x\mid x').$$
#
# Divide the two: $P_B$ cancels. With the **residual flow** $\tilde F = F/F^\sharp$ and the boundary
# condition $\tilde F(x_0) = R(x_0)^\beta$,
#
# $$\tilde F(x)\,\frac{P_F^\theta(x'\mid x)}{P_F^\sharp(x'\mid x)} = \tilde F(x').$$
#
# What is $\tilde F$ at the solution? The optimal policy is $P_F^*(x'|x) = P_F^\sharp(x'|x)\,\tilde F(x')/\tilde F(x)$;
# it is normalised iff $\tilde F(x) = \int P_F^\sharp(x'|x)\tilde F(x')\,dx'$, so by induction from
# $x_0$: $\tilde F_\tau(x) = \mathbb E_{P^\sharp}[R(x_0)^\beta \mid x_\tau = x]$. Since the tilted
# marginal is $p^*_\tau \propto p^\sharp_\tau\,\tilde F_\tau$,
#
# $$\nabla\log\tilde F_\tau(x) = \nabla\log p^*_\tau(x) - \nabla\log p^\sharp_\tau(x),\qquad
# \nabla\log\tilde F(x_0) = \beta\,\nabla r(x_0).$$
#
# For the toy both $p^*_\tau$ and $p^\sharp_\tau$ are Gaussian mixtures noised in closed form:
# `gmm.exact_flow_score`.
#
# **Checks:** at $\bar\alpha = 1$ the exact residual flow equals $\beta\nabla r$ (autograd); at
# every noise level it equals autograd of $\log p^*_\tau - \log p^\sharp_\tau$.

# %%
F64 = torch.float64
x = (2.5 * torch.randn(256, 2, generator=gen, dtype=F64)).requires_grad_(True)
(grad_r,) = torch.autograd.grad(task.reward(x).sum(), x)
at_data = gmm.exact_flow_score(task.prior, task.target, x.detach(), torch.ones(1, dtype=F64))
print(f"ᾱ = 1: max |exact ∇log F̃ − β∇r| = {float((at_data - task.beta * grad_r).abs().max()):.1e}")
for a in (0.9, 0.5, 0.1, 0.01):
    ab = torch.full((len(x),), a, dtype=F64)
    (auto,) = torch.autograd.grad((task.target.log_prob(x, ab) - task.prior.log_prob(x, ab)).sum(), x)
    exact = gmm.exact_flow_score(task.prior, task.target, x.detach(), ab)
    print(f"ᾱ = {a:<4}: max |exact ∇log F̃ − autograd(log p*_τ − log p♯_τ)| = {float((exact - auto).abs().max()):.1e}")

# %%
gx, gy, pts = grid(n=15, lim=4.0)
dense_x, dense_y, dense = grid(n=101, lim=4.0)
fig, axes = plt.subplots(1, 4, figsize=(13, 3.6))
for ax, i in zip(axes, (0, 20, 35, cfg.num_steps - 1)):
    a = schedule.alpha_bar[i].double()
    ax.contourf(dense_x, dense_y, task.target.log_prob(dense, a.expand(len(dense))).exp().reshape(dense_x.shape),
                levels=20, cmap="Greys")
    flow = gmm.exact_flow_score(task.prior, task.target, pts, a)
    ax.quiver(pts[:, 0], pts[:, 1], flow[:, 0], flow[:, 1], color="C3")
    ax.set(aspect="equal", xticks=[], yticks=[],
           title=f"step {i}, ᾱ = {float(a):.3f}\nmax ‖∇log F̃‖ = {float(flow.norm(dim=1).max()):.2f}")
fig.suptitle("exact residual flow ∇log F̃_τ (arrows, autoscaled per panel) over p*_τ (grey)")
plt.show()

# %% [markdown]
# At high noise the residual flow is weak and smooth: $x_\tau$ says little about which mode
# $x_0$ will land in. Near the data end it is $\beta\nabla r$ itself, pointing at the reward's
# centre everywhere. In between it reweights the modes.
#
# ## 4 · Residual ∇-DB: differentiate, and every normaliser drops out
#
# Take $\log$ of the residual balance and differentiate with respect to $x'$ and to $x$. The flow
# at the *other* state does not depend on the variable, so it drops out, and so does every
# normalising constant — there is no $\log Z$ to learn (paper eqs. 9–10):
#
# $$\textbf{forward:}\quad \nabla_{x'}\big[\log P_F^\theta(x'|x) - \log P_F^\sharp(x'|x)\big] = \nabla\log\tilde F(x')$$
# $$\textbf{reverse:}\quad \nabla_{x}\big[\log P_F^\theta(x'|x) - \log P_F^\sharp(x'|x)\big] = -\nabla\log\tilde F(x)$$
#
# For Gaussian steps with a shared $\sigma_\tau$ the forward left side is closed form and $x'$
# cancels: $(\mu_\theta(x) - \mu^\sharp(x))/\sigma_\tau^2$ (`ng.forward_residual`). The reverse
# left side is a vector–Jacobian product through the ε-network; `ng.nabla_db_loss` takes it with
# autograd.
#
# **Checks** with a perturbed copy of the pretrained network as $\theta$: the forward residual
# equals autograd of the log-ratio in $x'$, for any $x'$; the reverse residual equals central
# finite differences in $x$ (float64).

# %%
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

# %% [markdown]
# The forward equation says what the optimal step looks like: its mean is the pretrained mean
# shifted by $\sigma_\tau^2$ times the residual flow at the next state. No Gaussian satisfies it
# for every $x'$ when $\log\tilde F$ is not linear, so `toy_diagnostics.sample_oracle` linearises at
# $\mu^\sharp$: $\mu^* = \mu^\sharp(x) + \sigma_\tau^2\,\nabla\log\tilde F_{\tau'}(\mu^\sharp(x))$ with
# the *exact* flow. It is the best a Gaussian-step policy can do, and the bar every finetuned
# model is judged against (TV = total variation between mode weights and the target's).

# %%
oracle = toy_diagnostics.sample_oracle(task, reference, schedule, 2000, gen)
pretrained = toy_2d.sample(eps_ref, schedule, 2000, gen).final
exact = task.target.sample(2000, gen)
fig, axes = plt.subplots(1, 3, figsize=(9, 3.3))
for ax, (x, name) in zip(axes, [(pretrained, "pretrained P_F♯"), (oracle, "oracle (exact flow)"), (exact, "exact target p*")]):
    scatter(ax, x, f"{name}\nmode TV {toy_2d.metrics(task, x)['mode_tv']:.3f}")
plt.show()

# %% [markdown]
# ## 5 · The forward-looking flow
#
# The loss needs $\nabla\log\tilde F$ at every state, and a network $g_\phi$ learning it from
# scratch would be slow. The paper writes it as a guess plus a learned correction (eq. 12):
#
# $$\nabla\log\tilde F_\tau(x) \;\approx\; \beta\,\gamma_\tau\,\nabla_x r\big(\hat x_0(x)\big) + g_\phi(x,\tau),\qquad g_\phi(x_0,\cdot) = 0.$$
#
# Why this guess: $\log\tilde F_\tau(x) = \log\mathbb E[e^{\beta r(x_0)}\mid x_\tau = x]$, and if the
# posterior of $x_0$ given $x$ were a point mass at its mean $\hat x_0(x)$ (Tweedie), this would be
# $\beta r(\hat x_0(x))$. That is exact at the data end and increasingly wrong as the posterior
# widens; $\gamma_\tau \in \{\bar\alpha_\tau, \sqrt{\bar\alpha_\tau}\}$ damps it at high noise
# (official code: $\bar\alpha$; `toy_2d`'s default is printed at the top). $\hat x_0$ uses the
# *finetuned* $\hat\epsilon_\theta$ and the gradient runs through it, then is detached: it is a
# target, never a path for parameter gradients (`ng.forward_looking_score`).
#
# **Check:** `ng.forward_looking_score` equals autograd of $\beta\gamma_\tau\,r(\hat x_0(x))$.

# %%
i, n = 30, 64
x, t, a = traj.states[:n, i], schedule.timesteps[i].expand(n), schedule.alpha_bar[i].expand(n)
guess, _ = ng.forward_looking_score(eps_ref, task.log_reward, x, t, a, torch.arange(n), cfg.beta, cfg.gamma)
xg = x.clone().requires_grad_(True)
(auto,) = torch.autograd.grad(task.reward(ng.x0_prediction(xg, eps_ref(xg, t, None), a)).sum(), xg)
auto = cfg.beta * ng.gamma_weight(a, cfg.gamma)[:, None] * auto
print(f"max |forward_looking_score − autograd of βγ r(x̂_0(x))| = {float((guess - auto).abs().max()):.1e}")

# %% [markdown]
# **What the guess gets right and wrong at each noise level.** On the pretrained model's own
# states, compare the guess with the exact $\nabla\log\tilde F$ per step: the relative error
# (`toy_diagnostics.flow_errors`; a zero guess scores 1), and, since $\gamma_\tau$ only scales, the
# *direction* (cosine) and the scale $\gamma^*_\tau$ that would fit best,
# $\gamma^*_\tau = \langle G, \nabla\log\tilde F\rangle / \|G\|^2$ with $G = \beta\nabla_x r(\hat x_0(x))$ undamped.

# %%
errors = {g: toy_diagnostics.flow_errors(task, reference, None, traj, schedule, dataclasses.replace(cfg, gamma=g))["guess"]
          for g in ng.GAMMA_CHOICES}
cosine, gamma_star = [], []
for i in range(cfg.num_steps):
    x, n = traj.states[:, i], len(traj.states)
    t, a = schedule.timesteps[i].expand(n), schedule.alpha_bar[i].expand(n)
    guess, _ = ng.forward_looking_score(eps_ref, task.log_reward, x, t, a, torch.arange(n), cfg.beta, cfg.gamma)
    undamped = guess / ng.gamma_weight(a, cfg.gamma)[:, None]          # β ∇_x r(x̂_0(x))
    exact = gmm.exact_flow_score(task.prior, task.target, x, a)
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

# %%
fig, axes = plt.subplots(1, 3, figsize=(12, 4))
for ax, i in zip(axes, (10, 30, 45)):
    x, n = traj.states[:80, i], 80
    t, a = schedule.timesteps[i].expand(n), schedule.alpha_bar[i].expand(n)
    guess, _ = ng.forward_looking_score(eps_ref, task.log_reward, x, t, a, torch.arange(n), cfg.beta, cfg.gamma)
    exact = gmm.exact_flow_score(task.prior, task.target, x, a)
    scale = float(exact.norm(dim=1).max()) * 8
    ax.quiver(x[:, 0], x[:, 1], exact[:, 0], exact[:, 1], color="C3", scale=scale, label="exact ∇log F̃")
    ax.quiver(x[:, 0], x[:, 1], guess[:, 0], guess[:, 1], color="C0", scale=scale, label=f"guess (γ = {cfg.gamma})")
    lim = 1.15 * float(x.abs().max())
    ax.set(xlim=(-lim, lim), ylim=(-lim, lim), aspect="equal", xticks=[], yticks=[],
           title=f"step {i}, ᾱ = {float(a[0]):.2f}")
axes[0].legend(loc="lower left")
fig.suptitle("forward-looking guess vs exact residual flow, at the pretrained model's own states")
plt.show()

# %% [markdown]
# Reading the plots (this toy, the pretrained model's states): near the data end the guess is
# nearly exact — the posterior of $x_0$ is narrow there, and the last transition uses
# $\beta\nabla r(x_0)$ itself. Over most of the chain the undamped guess
# $\beta\nabla r(\hat x_0)$ points the right way (cosine near 1), and the best-fitting scale
# $\gamma^*$ stays above both damping choices: what the damped guess gets wrong there is mostly
# its *size* (too small; $\sqrt{\bar\alpha}$ less so than $\bar\alpha$). Only at the highest
# noise does the direction go wrong and $\gamma^*$ drop to zero: $\hat x_0(x)$ is then near the
# ring's centre, and the reward at that one point says little about
# $\log\mathbb E[R^\beta\mid x]$, which averages over all the modes. Everything the guess
# misses is what $g_\phi$ has to learn (plotted after training in `02_toy_2d.ipynb`).
#
# ## 6 · The loss
#
# Per transition $(x,\tau)\to(x',\tau')$, with $\mathrm{sg}[\cdot]$ a stop-gradient and
# $s(x) = \beta\gamma_\tau\nabla r(\hat x_0(x))$ the guess (`ng.nabla_db_loss`, paper eqs. 10–13):
#
# $$L_F = \Big\|\frac{\mu_\theta(x) - \mu^\sharp(x)}{\sigma_\tau^2} - \mathrm{sg}\big[s(x')\big] - g_\phi(x',\tau')\Big\|^2 \qquad\text{(at } x' = x_0\text{: the exact } \beta\nabla r(x_0)\text{, no } g_\phi)$$
# $$L_B = \Big\|\mathrm{sg}\big[\nabla_x(\log P_F^\theta - \log P_F^\sharp)(x'|x)\big] + \mathrm{sg}\big[s(x)\big] + g_\phi(x,\tau)\Big\|^2,\qquad
# L_T = \|g_\phi(x_0)\|^2,\qquad L_\lambda = \lambda\,\|\hat\epsilon_\theta(x) - \hat\epsilon_{\text{old}}(x)\|^2.$$
#
# $L_F$ trains the policy (and $g_\phi$ at $x'$), $L_B$ only $g_\phi$; `ng.transition_weights`
# optionally weights each transition by powers of $\sigma_\tau^2$ (`weighting`; the paper's is
# `plain`). **Checks:**
#
# 1. At the reference ($\theta = \sharp$, $g_\phi \equiv 0$ as initialised) with a constant reward the
#    loss is exactly zero: nothing to correct.
# 2. With the real reward the same model has a positive loss: that is the learning signal.
# 3. At the oracle — the linearised optimal step of §4 as the policy, and $g_\phi$ = exact flow −
#    guess — the loss is not exactly zero, because a Gaussian step only matches $\tilde F$ to first
#    order; but it goes to zero as the steps get finer ($\sigma_\tau^2 \sim 1/T$).

# %%
batch = ng.gather_transitions(traj, schedule, ng.subsample_steps(cfg.num_steps, 1.0, len(traj.states), gen))
paper_loss = dataclasses.replace(cfg.loss_config, flow_target="bootstrap", control_variate=False)   # §6 is the paper's loss; toy_2d's own default target is in §7
zero_flow = toy_2d.as_eps_fn(toy_2d.make_flow(cfg))       # g_φ with its zeroed output layer
constant_reward = lambda x0, traj: 0.0 * x0.sum(1)         # ∇r ≡ 0
for name, log_reward in (("constant reward", constant_reward), ("real reward", task.log_reward)):
    loss, parts = ng.nabla_db_loss(batch, eps_ref, eps_ref, log_reward, zero_flow, paper_loss)
    print(f"θ = ♯, g_φ = 0, {name:<15}: " + ", ".join(f"{k} {float(v):.3g}" for k, v in parts.items() if k != "reward_next"))


# %%
def oracle_flow_fn(policy_eps):
    """g_φ = exact ∇log F̃ − guess, so that guess + g_φ is exact; g_φ(x_0) = 0 (label t = 0)."""
    alphas_cumprod = scheduler.alphas_cumprod
    def flow(x, t, traj):
        a = alphas_cumprod[t]
        guess, _ = ng.forward_looking_score(policy_eps, task.log_reward, x, t, a, traj, cfg.beta, cfg.gamma)
        g = gmm.exact_flow_score(task.prior, task.target, x, a) - guess
        return torch.where((t == 0)[:, None], torch.zeros_like(g), g)
    return flow

ratios = {}
for T in (10, 25, 50, 100, 200):
    sched_T = ng.ddim_schedule(toy_2d.sd_scheduler(), T)
    policy_eps = toy_diagnostics.oracle_eps(task, eps_ref, sched_T)   # μ♯ + σ² ∇log F̃_τ'(μ♯), as in §4
    traj_T = toy_2d.sample(policy_eps, sched_T, 64, torch.Generator().manual_seed(1))
    batch_T = ng.gather_transitions(traj_T, sched_T, torch.arange(T).expand(64, T))   # every transition
    _, at_oracle = ng.nabla_db_loss(batch_T, policy_eps, eps_ref, task.log_reward, oracle_flow_fn(policy_eps), paper_loss)
    _, at_reference = ng.nabla_db_loss(batch_T, eps_ref, eps_ref, task.log_reward, zero_flow, paper_loss)
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

# %% [markdown]
# ## 7 · Solving the reverse condition along the trajectory: the lean adjoint
#
# The loss of §6 never computes $\nabla\log\tilde F$: $g_\phi$ is fitted to the reverse residual,
# whose target is the policy's forward residual at $x'$, itself fitted to the flow model
# (guess + $g_\phi$) at $x'$. The flow at $x$ is learned from the flow one step later — a one-link
# *bootstrap*, like TD(0) — and on the toy it plateaus (numbers at the end of this section). The reverse condition
# can instead be solved along each sampled trajectory, from the terminal condition.
#
# Summed over $x'$, residual detailed balance says $\tilde F(x) = \mathbb E_{P_F^\sharp(x'|x)}[\tilde F(x')]$.
# Write $x' = \mu^\sharp(x) + \sigma_\tau\xi$, $\xi\sim\mathcal N(0, I)$ with $\sigma_\tau$ independent of
# $x$, and differentiate under the expectation, with $J^\sharp = \partial\mu^\sharp/\partial x$:
#
# $$\nabla\log\tilde F(x) = \frac{\mathbb E_\xi\big[J^\sharp(x)^\top\nabla\tilde F(x')\big]}{\tilde F(x)}
# = \mathbb E_{x'\sim P^*(\cdot|x)}\big[J^\sharp(x)^\top\,\nabla\log\tilde F(x')\big],\qquad
# P^*(x'|x) = P_F^\sharp(x'|x)\,\frac{\tilde F(x')}{\tilde F(x)}.$$
#
# This is the reverse ∇-DB in expectation, solved for $\nabla\log\tilde F(x)$. Unrolled from the
# terminal condition $\nabla\log\tilde F(x_0) = \beta\nabla r(x_0)$ along one path (states indexed
# by step, $x_T$ = noise at step 0 … $x_0$ at step $T$, as the code stores them):
#
# $$a_T = \beta\,\nabla r(x_0),\qquad a_i = J^\sharp(x_i)^\top a_{i+1},\quad i = T-1,\dots,0,$$
#
# one vector–Jacobian product through the *frozen* reference step mean per step
# (`ng.lean_adjoint`). By induction $\mathbb E[a_i\mid x_i] = \nabla\log\tilde F(x_i)$ when the
# rest of the path follows the optimal policy $P^*$: a Monte-Carlo estimate of the flow, anchored at
# the exact terminal condition and using no flow model at all. Along other paths (the pretrained
# model's, at the start of finetuning) it is biased, and the bias vanishes as the policy approaches
# $P^*$, so the fixed point is right. It is the recursion of Adjoint Matching (Domingo-Enrich et al.,
# ICLR 2025); the bootstrapped reverse ∇-DB is its TD(0) form, a blend (`flow_target="mixed"`) its
# TD(λ) form.
#
# **Check.** Along paths of the oracle policy (the linearised $P^*$ of §4), the mean of
# $a_i - \nabla\log\tilde F(x_i)$ over paths is zero within Monte-Carlo error at every step, and so is
# the scale of $a_i$ along the exact flow minus one, $c_i - 1$ with
# $c_i = \sum\langle a_i, \nabla\log\tilde F\rangle / \sum\|\nabla\log\tilde F\|^2$. The pretrained model here
# is the prior's exact ε-model (`toy_diagnostics.analytic_eps`), so that `gmm.exact_flow_score` is *its*
# residual flow. Two priors: the ring with modes of std 0.5, and this notebook's ring (std 0.3),
# where the same check holds but with wide error bars: there a few paths in ten thousand pass
# between modes at low noise, where the exact model's Jacobian is large, and carry $\|a_i\|$ in
# the hundreds — a heavy-tailed estimate, right on average. At the last few steps the Monte-Carlo
# error gets so small that a bias well under 1 % shows: the oracle is $P^*$ linearised, and the
# 50-step chain's flow is not exactly the continuous-time one that `exact_flow_score` computes.

# %%
import json

wide = toy_2d.build_task(dataclasses.replace(cfg, prior=json.dumps({**toy_2d.PRIOR_PRESETS[cfg.prior], "std": 0.5})))
ALPHA_BAR_PATH = torch.cat([schedule.alpha_bar, torch.ones(1)])   # ᾱ at states 0 … T (x_0: ᾱ = 1)

def flow_along(toy, paths):
    """Exact ∇log F̃ at every state of the paths: (N, T+1, 2)."""
    return torch.stack([gmm.exact_flow_score(toy.prior, toy.target, paths.states[:, i], ALPHA_BAR_PATH[i])
                        for i in range(cfg.num_steps + 1)], 1)

def scale_along_exact(estimate, exact):
    """c_i = Σ⟨estimate, exact⟩ / Σ‖exact‖² per step, and its standard error over paths (delta method)."""
    dot, sq = (estimate * exact).sum(-1), exact.pow(2).sum(-1)   # (N, steps)
    c = dot.sum(0) / sq.sum(0)
    return c, (dot - c * sq).std(0) / (sq.mean(0) * len(dot) ** 0.5)

def adjoint_along_oracle(toy, n_paths):
    """The exact ε-model of toy's prior, n oracle paths, their lean adjoints and the exact flow along them."""
    eps_exact = toy_diagnostics.analytic_eps(toy.prior, scheduler.alphas_cumprod)
    paths = toy_2d.sample(toy_diagnostics.oracle_eps(toy, eps_exact, schedule), schedule, n_paths, gen)
    adjoint, _ = ng.lean_adjoint(eps_exact, schedule, paths, toy.log_reward, toy.beta)   # (N, T+1, 2)
    return eps_exact, paths, adjoint, flow_along(toy, paths)

n_paths = 8192
for name, toy in (("modes of std 0.5", wide), ("modes of std 0.3 (this notebook's task)", task)):
    eps_exact, paths, adjoint, exact = adjoint_along_oracle(toy, n_paths)
    x0 = paths.final.clone().requires_grad_(True)
    (grad_r,) = torch.autograd.grad(toy.reward(x0).sum(), x0)
    difference = (adjoint - exact)[:, :-1]                                    # steps 0 … T−1 (a_T is exact)
    z = difference.mean(0) / (difference.std(0) / n_paths ** 0.5)            # (T, 2) z-scores
    c, c_se = scale_along_exact(adjoint, exact)
    print(f"{name}: a_T − β∇r(x_0) = {float((adjoint[:, -1] - toy.beta * grad_r).abs().max()):.0e}; mean of a_i − exact "
          f"∇log F̃(x_i) over {n_paths} oracle paths: |z| < 2 in {float((z.abs() < 2).float().mean()):.0%} of the {z.numel()} "
          f"(step, coordinate) pairs; max ‖a_i‖ {float(adjoint.norm(dim=-1).max()):.0f}")
    worst = int(z.abs().amax(1).argmax())
    bias = float(difference[:, worst].mean(0).norm() / exact[:, worst].norm(dim=-1).mean())
    print(f"  largest |z| {float(z.abs().max()):.1f} at step {worst}, a mean difference of {bias:.1%} of ‖exact‖; "
          f"|z| < 3 at steps 0 … 44: {bool((z[:45].abs() < 3).all())}")
    print("  c_i = " + ", ".join(f"{float(c[i]):.3f} ± {float(c_se[i]):.3f} (step {i})" for i in (0, 10, 20, 30, 40, 45)))

# %% [markdown]
# Each $a_i$ is one sample: its mean is right, its spread is not small (compare $\|a_i\|$ with
# $\|\nabla\log\tilde F\|$ at high noise). A regression on it — $g_\phi(x')$ fitted to $a_{i+1}$ minus the
# guess (`flow_target="adjoint"`), or $\theta$'s forward residual fitted to $a_{i+1}$ directly (adjoint
# matching) — averages that spread away.
#
# **Bootstrapped vs adjoint-anchored, per step.** In expectation over $x'$ the reverse residual of a
# policy with forward residual $\delta(x) = (\mu_\theta - \mu^\sharp)/\sigma^2$ is
# $-\mathbb E\,\nabla_x(\log P_F^\theta - \log P_F^\sharp)(x'|x) = J^\sharp(x)^\top\delta(x)$, and $\delta$
# is fitted to the flow model $f$ at $x'$. So the best the bootstrapped target can be is one link of
# the recursion from the flow model: $b_i = J^\sharp(x_i)^\top f(x_{i+1})$. With $f$ = the forward-looking
# guess (where training starts: $g_\phi = 0$) it inherits the guess's error one step later; with
# $f$ = the exact flow it would be right — the fixed point is the same, what differs is where the
# error comes from. Side by side, along oracle paths of the std-0.5 ring: the scale $c_i$ of each target along
# the exact flow (bias; 1 = unbiased) and its per-sample relative error (bias and spread); and the
# adjoint along the pretrained model's own paths, where it over-estimates at high noise.

# %%
eps_exact, oracle_paths, adjoint, exact_path = adjoint_along_oracle(wide, n_paths)

def one_link(paths, flow_next):
    """b_i = J♯(x_i)ᵀ f(x_{i+1}) for every step: the reverse recursion taken once from f. (N, T, 2)."""
    links = []
    for i in range(cfg.num_steps):
        x = paths.states[:, i].clone().requires_grad_(True)
        mean = ng.step_mean(x, eps_exact(x, schedule.timesteps[i].expand(len(x)), None), *coefficients(schedule, i, len(x)))
        (vjp,) = torch.autograd.grad(mean, x, grad_outputs=flow_next[:, i])
        links.append(vjp)
    return torch.stack(links, 1)

def guess_along(paths):
    """The forward-looking guess βγ_τ∇r(x̂_0(x)) (g_φ = 0) at states 1 … T−1, and β∇r(x_0) at x_0: (N, T, 2)."""
    n, out = len(paths.states), []
    for i in range(1, cfg.num_steps):
        t, a = schedule.timesteps[i].expand(n), schedule.alpha_bar[i].expand(n)
        out.append(ng.forward_looking_score(eps_exact, wide.log_reward, paths.states[:, i], t, a, torch.arange(n), cfg.beta, cfg.gamma)[0])
    return torch.stack(out + [cfg.beta * ng.reward_gradient(wide.log_reward, paths.final, torch.arange(n))[0]], 1)

m = 2048                                                                      # the one-link targets are cheap to average
sub = ng.Trajectory(oracle_paths.states[:m], oracle_paths.eps[:m])
targets = {"bootstrap from the guess": (one_link(sub, guess_along(sub)), exact_path[:m, :-1]),
           "bootstrap from the exact flow": (one_link(sub, exact_path[:m, 1:]), exact_path[:m, :-1]),
           "lean adjoint a_i": (adjoint[:, :-1], exact_path[:, :-1])}
pretrained_paths = toy_2d.sample(eps_exact, schedule, n_paths, gen)
adjoint_pretrained, _ = ng.lean_adjoint(eps_exact, schedule, pretrained_paths, wide.log_reward, wide.beta)
c_pretrained, _ = scale_along_exact(adjoint_pretrained[:, :-1], flow_along(wide, pretrained_paths)[:, :-1])

steps = np.arange(cfg.num_steps)
fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
for (name, (estimate, exact)), color in zip(targets.items(), ("C0", "C2", "C3")):
    c, se = scale_along_exact(estimate, exact)
    axes[0].plot(steps, c, color=color, label=name, ls="-." if "exact" in name else "-")
    axes[0].fill_between(steps, c - 2 * se, c + 2 * se, color=color, alpha=0.2, lw=0)
    axes[1].plot(steps, (estimate - exact).norm(dim=-1).mean(0) / exact.norm(dim=-1).mean(0), color=color, label=name)
axes[0].plot(steps, c_pretrained, color="C3", ls="--", label="lean adjoint, pretrained paths")
axes[0].axhline(1.0, color="k", lw=0.8, ls=":")
axes[0].set(xlabel="step (0 = noise)", title="bias: scale along the exact flow, c_i (±2 s.e.)", ylim=(0, 2))
axes[1].set(xlabel="step (0 = noise)", title="per sample: ‖target − exact‖ / ‖exact‖", yscale="log")
axes[0].legend(fontsize=7)
plt.show()
for i in (0, 10, 20, 30, 40):
    row = {name: float(scale_along_exact(est, ex)[0][i]) for name, (est, ex) in targets.items()}
    print(f"step {i:>2}: c = " + ", ".join(f"{v:.2f} ({k})" for k, v in row.items())
          + f", {float(c_pretrained[i]):.2f} (adjoint, pretrained paths)")

# %% [markdown]
# What the toy shows: bootstrapping from the guess starts far too small at the mode-choosing steps —
# it can only become right as fast as $g_\phi$ fixes the flow one step later, and the fit errors
# made at low noise are carried up the chain link by link. The adjoint is right on average at
# every step from the first update on (along oracle paths; along the pretrained paths it
# over-shoots at high noise, a bias that shrinks as the policy improves), at the price of a
# noisier per-sample target and one reference VJP per step. Trained on ring8/bump (500 updates ×
# 128 trajectories, mode TV over 3 seeds, measured in the development of `nabla_gfn.py`'s
# `flow_target`): the paper's bootstrap 0.183 ± 0.039; $g_\phi(x')$ regressed on $a_{i+1}$
# (`LossConfig(flow_target="adjoint")`) 0.053 ± 0.018; $L_B$'s target blended half-and-half
# (`"mixed"`) 0.050 ± 0.009; no $g_\phi$, the policy's forward residual regressed on $a_{i+1}$
# (adjoint matching, `use_flow=False, flow_target="adjoint"`) 0.056 ± 0.011; the exact-flow oracle
# 0.03.
#
# Next: `02_toy_2d.ipynb` trains $\theta$ and $g_\phi$ with this loss on the same toy and
# watches the samples move towards the exact target.
