"""
Lazy AdamW for the STEM tables: AdamW applied only to the rows a step touched, and its
catch-up variant, which applies a row's skipped steps when the row is next read, so that
lazy training equals dense AdamW (the paper's optimiser) to float tolerance.

tables.LazyTables runs it on the rows of its pool, resident or offloaded alike.
"""

import math

import torch


class LazyAdamW:
    """AdamW restricted to given rows: torch's own fused AdamW kernel run on the rows in
    place, so that a row touched at every step follows dense AdamW exactly. Bias correction
    uses the global step.

    catch_up=None: untouched rows do not move (no decay, no moment decay) - lazy AdamW.
    catch_up="full": a row's skipped steps are applied when it is next read, as dense AdamW
    would have applied them with a zero gradient: the weight decays every step and keeps
    moving along its decaying first moment. Over the steps s = a+1 .. c after its last
    touch a (lr_s the step's rate, d_s = 1 - lr_s * wd, rho = beta1 / sqrt(beta2)):

        m_c = beta1^(c-a) m_a,   v_c = beta2^(c-a) v_a
        w_c = (prod_s d_s) w_a - sum_s (prod_{r>s} d_r) lr_s sqrt(1-beta2^s)/(1-beta1^s) rho^(s-a) u
        u   = m_a / (sqrt(v_a) + eps)

    exact but for eps: dense AdamW divides by sqrt(v_s) + eps sqrt(1-beta2^s), whose eps
    part does not decay with v; here eps decays with it, a relative difference in a skipped
    step's move of about eps / sqrt(v_a) (1e-8 against table gradients of 1e-6 and up:
    below 1e-2 of an already small move, and 0 when eps is 0). The sum runs over at most
    `window` skipped steps: rho^window < 1e-20, beyond which the terms are below float64's
    resolution. Products of d come from a float64 prefix sum of log d over steps.
    "decay" and "momentum" apply one of the two halves (ablations)."""

    def __init__(self, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, catch_up=None):
        self.beta1, self.beta2 = betas
        self.eps, self.weight_decay = eps, weight_decay
        self.catch_up_mode = catch_up
        self.step = torch.zeros(())       # the global step, a tensor as torch's kernel wants it,
        self._steps = 0                   # and as a host int: reading the tensor would wait for the GPU
        if catch_up:
            rho = self.beta1 / math.sqrt(self.beta2)
            if not rho < 1:
                raise ValueError(f"catch-up needs beta1 < sqrt(beta2) (got {self.beta1}, {self.beta2}): a "
                                 f"skipped row's moves would not decay")
            self.window = math.ceil(math.log(1e-20) / math.log(rho)) if rho > 0 else 1
            # per step s = 0..c: log_decay_prefix[s] = sum_{r<=s} log d_r, move_scale[s] = lr_s sqrt(bc2)/bc1
            self.log_decay_prefix = torch.zeros(1, dtype=torch.float64)
            self.move_scale = torch.zeros(1, dtype=torch.float64)
            self.last_step = None         # (vocab,) int64: the step each row was last brought up to

    @property
    def step_count(self):
        return self._steps

    @step_count.setter
    def step_count(self, value):
        self.step.fill_(value)
        self._steps = value

    def update(self, weights, exp_avgs, exp_avg_sqs, grads, lr, ids=None):
        """Lists of the touched rows (views into the pools: updated in place), one tensor
        per row: torch's fused kernel runs over the rows where they lie, instead of on a
        gathered copy that would be scattered back (6 passes over the rows saved). ids:
        the rows' token ids (catch-up keeps the step of each id)."""
        self.step += 1
        self._steps += 1
        if weights:
            # every row is at the global step: one step tensor, read for each row (the kernel only reads it)
            self.step = self.step.to(weights[0].device)
            torch._fused_adamw_(weights, grads, exp_avgs, exp_avg_sqs, [], [self.step] * len(weights), lr=lr,
                                beta1=self.beta1, beta2=self.beta2, weight_decay=self.weight_decay, eps=self.eps,
                                amsgrad=False, maximize=False)
        if self.catch_up_mode:
            self._record_step(lr)
            self.last_step[ids] = self.step_count

    # -- catch-up ------------------------------------------------------------------------

    def _record_step(self, lr):
        s = self.step_count          # the step just taken
        decay = math.log1p(-lr * self.weight_decay) if lr * self.weight_decay < 1 else -math.inf
        bias = math.sqrt(1 - self.beta2 ** s) / (1 - self.beta1 ** s)
        self.log_decay_prefix = torch.cat([self.log_decay_prefix, self.log_decay_prefix[-1:] + decay])
        # (device ops on the last entry: a new tensor from a Python float would be a copy to the GPU)
        self.move_scale = torch.cat([self.move_scale, self.move_scale[-1:] * 0 + lr * bias])

    def track(self, n_rows, device):
        """Start tracking n_rows rows (all at the current step)."""
        if self.catch_up_mode and self.last_step is None:
            self.last_step = torch.full((n_rows,), self.step_count, dtype=torch.long, device=device)
            self.log_decay_prefix = self.log_decay_prefix.to(device)     # the history sits beside last_step
            self.move_scale = self.move_scale.to(device)

    def catch_up(self, weight, exp_avg, exp_avg_sq, slots, ids, chunk_rows=4096):
        """Bring the rows at `slots` of the pools (token ids `ids`) to the current step, in place."""
        if not self.catch_up_mode:
            return
        c = self.step_count
        for start in range(0, len(ids), chunk_rows):
            part_slots, part_ids = slots[start:start + chunk_rows], ids[start:start + chunk_rows]
            rows = [pool.index_select(0, part_slots) for pool in (weight, exp_avg, exp_avg_sq)]   # (K, ...) each
            rows = self._brought_up(*rows, self.last_step[part_ids.to(self.last_step.device)], c)
            for pool, part in zip((weight, exp_avg, exp_avg_sq), rows):
                pool.index_copy_(0, part_slots, part)
        self.last_step[ids.to(self.last_step.device)] = c

    def current_weight(self, w, m, v, ids):
        """The weights that rows w (K, ...) of token ids `ids` have at the current step,
        without changing any state (reads for evaluation)."""
        if not self.catch_up_mode:
            return w
        return self._brought_up(w, m, v, self.last_step[ids.to(self.last_step.device)], self.step_count)[0]

    def _brought_up(self, w, m, v, last, c):
        """Rows (w, m, v) last brought up to steps `last` (K,), brought up to step c."""
        keep, move, moment_steps = self._coefficients(last, c)
        shape = (-1,) + (1,) * (w.dim() - 1)
        keep, move = keep.to(w.device, w.dtype).view(shape), move.to(w.device, w.dtype).view(shape)
        moment_steps = moment_steps.to(w.device).view(shape)
        u = m / (v.sqrt() + self.eps)                                               # (K, ...)
        w = w * keep - move * u
        if self.catch_up_mode != "decay":
            m = m * self.beta1 ** moment_steps.to(w.dtype)
            v = v * self.beta2 ** moment_steps.to(w.dtype)
        return w, m, v

    def _coefficients(self, last, c):
        """(keep, move, gap) per row of last-touched steps `last` (K,), brought up to step c:
        w_c = keep * w_a - move * u, all float64 (K,)."""
        log_decay = self.log_decay_prefix.to(last.device)
        move_scale = self.move_scale.to(last.device)
        gap = c - last                                                              # (K,)
        keep = torch.exp(log_decay[c] - log_decay[last])
        window = min(c, self.window)
        j = torch.arange(1, window + 1, device=last.device)                        # (J,)
        steps = (last[:, None] + j[None, :]).clamp(max=c)                          # (K, J): s = a + j
        rho = self.beta1 / math.sqrt(self.beta2)
        terms = move_scale[steps] * rho ** j.double()[None, :]
        if self.catch_up_mode != "momentum":
            terms = terms * torch.exp(log_decay[c] - log_decay[steps])             # prod_{r>s} d_r
        move = torch.where(j[None, :] <= gap[:, None], terms, 0.0).sum(1)          # (K,)
        if self.catch_up_mode == "decay":
            move = torch.zeros_like(move)
        elif self.catch_up_mode == "momentum":
            keep = torch.ones_like(keep)
        return keep, move, gap

    def state_dict(self):
        state = {"step_count": self.step_count}
        if self.catch_up_mode:
            # copies, also on the CPU: a checkpoint loaded in place must not write into the live state
            state.update(last_step=self.last_step.to("cpu", copy=True),
                         log_decay_prefix=self.log_decay_prefix.to("cpu", copy=True),
                         move_scale=self.move_scale.to("cpu", copy=True))
        return state

    def load_state_dict(self, state):
        self.step_count = state["step_count"]
        if self.catch_up_mode:
            device = self.last_step.device
            self.last_step = state["last_step"].to(device)
            self.log_decay_prefix = state["log_decay_prefix"].to(device)
            self.move_scale = state["move_scale"].to(device)
