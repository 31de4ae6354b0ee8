"""Muon (Keller Jordan; airbench94_muon) for the convolution filters, with SGD for every other parameter, as one
optimizer.

Muon steps each filter by its momentum orthogonalized: the update, read as an out x (in * kh * kw) matrix, has
its singular values pushed towards 1 by a Newton-Schulz iteration, so every direction of the filter moves by about
the learning rate, however skewed the gradient's spectrum is.

Why not torch.optim.Muon: it refuses parameters that are not 2-D, so it cannot take a 4-D filter, and it is an
optimizer of its own, where the train stage's OneCycle schedule, fp16 loss scaling and checkpoint each drive one.
Here one torch.optim.SGD carries both kinds of group: a Muon group's gradient is replaced by its orthogonalized
momentum just before SGD's own step, which then runs without momentum or decay for that group, so the schedule
moves every group's learning rate, and the momentum buffers are in the optimizer's state_dict as SGD's are.
"""
import torch

# The quintic Newton-Schulz iteration's coefficients (Keller Jordan's, as torch.optim.Muon's): chosen for the
# steepest slope at zero, so 5 steps bring every singular value into about [0.7, 1.2] rather than exactly to 1,
# which trains as well as the exact orthogonalization
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5


def orthogonalize(matrix, steps=NS_STEPS, dtype=torch.float32):
    """The matrix with its singular values moved near 1 (U S' V^T for its SVD U S V^T), computed in `dtype`
    (bf16 where the device computes it natively: the iteration tolerates its rounding, as airbench's does)."""
    a, b, c = NS_COEFFICIENTS
    x = matrix.to(dtype)
    tall = x.size(0) > x.size(1)
    if tall:  # iterate on the wide side: X X^T is the smaller product
        x = x.T
    x = x / (x.norm() + 1e-7)  # Frobenius norm >= spectral norm: every singular value <= 1, where NS converges
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x.T if tall else x).to(matrix.dtype)


class Muon(torch.optim.SGD):
    """SGD whose groups with `orthogonalize: True` take Muon's step instead: Nesterov momentum (`momentum`, kept
    in the state as `muon_buffer`), orthogonalized per filter, at the group's lr. Those groups' parameters must
    each feed a BatchNorm (every convolution of cifar.model does): their scale then changes nothing the network
    computes, so each filter is first brought back to the norm sqrt(out channels) (every row of unit norm on
    average, airbench's rule) and the step's size relative to the filter stays the learning rate, where
    otherwise the filters would grow and their effective step shrink; weight decay would only fight that
    norm, so these groups have none. Other groups are plain torch SGD, with the constructor's momentum,
    nesterov and weight_decay."""

    def __init__(self, params, lr, momentum, nesterov, weight_decay, ns_dtype=torch.float32):
        # never fused: a fused SGD takes fp16's loss scale into its own step, before this one's orthogonalization
        super().__init__(params, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)
        self.ns_dtype = ns_dtype
        for group in self.param_groups:
            group.setdefault("orthogonalize", False)
            if group["orthogonalize"]:
                # SGD applies the already-made update as it is: lr * update, nothing added
                group.update(muon_momentum=group["momentum"], momentum=0.0, nesterov=False, weight_decay=0.0)

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            if not group["orthogonalize"]:
                continue
            momentum = group["muon_momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "muon_buffer" not in state:
                    state["muon_buffer"] = torch.zeros_like(p.grad)
                buffer = state["muon_buffer"].mul_(momentum).add_(p.grad)
                update = p.grad.add(buffer, alpha=momentum)  # Nesterov: the gradient plus the momentum ahead
                rows = len(p)
                p.mul_(rows ** 0.5 / p.norm().clamp(min=1e-12))
                p.grad.copy_(orthogonalize(update.reshape(rows, -1), dtype=self.ns_dtype).view_as(p))
        return super().step(closure)
