"""Privacy accountants for DP-SGD with Poisson sampling (the sampled Gaussian mechanism).

Two accountants, behind one registry (``make_accountant('rdp' | 'prv')``):

* :class:`RDPAccountant` — Rényi DP of the sampled Gaussian mechanism (Mironov, Talwar & Zhang 2019), composed over
  steps and converted to (ε, δ) with the improved conversion of Balle et al. 2020 (Theorem 21), as Opacus and
  TensorFlow Privacy do today. ``conversion='classic'`` gives the older ``ε = RDP − log δ / (α − 1)``.
* :class:`PRVAccountant` — a tight numerical accountant: the privacy-loss random variable of one step is discretised
  on a fine grid, the steps are composed exactly by FFT, and δ(ε) = E[(1 − e^{ε − L})₊] is evaluated on the
  result (Koskela et al. 2020; Gopi, Lee & Wutschitz 2021). It takes the worse of the two directions of the
  add/remove neighbouring relation.

Both keep a history of ``(noise_multiplier, sample_rate, steps)`` so the noise may change during training.
"""

from __future__ import annotations

import math
import numbers

import torch

_MAX_SERIES_TERMS = 1_000_000  # the fractional-order series converges in far fewer terms for any valid input
# Opacus's default orders: dense near 1, integers up to 63.
DEFAULT_ALPHAS: list[float] = [1 + x / 10.0 for x in range(1, 100)] + [float(a) for a in range(12, 64)]


# ------------------------------------------------------------------------------------------------ log-space helpers
def _log_add(a: float, b: float) -> float:
    if a == -math.inf:
        return b
    if b == -math.inf:
        return a
    hi, lo = max(a, b), min(a, b)
    return hi + math.log1p(math.exp(lo - hi))


def _log_sub(a: float, b: float) -> float:
    """log(exp(a) - exp(b)), for a >= b."""
    if b == -math.inf:
        return a
    if a == b:
        return -math.inf
    return a + math.log1p(-math.exp(b - a)) if a - b > 1e-12 else -math.inf


def _log_erfc(x: float) -> float:
    if x < 25.0:
        return math.log(math.erfc(x))
    # Asymptotic expansion, where erfc underflows.
    r = 1.0 / (x * x)
    return -x * x - math.log(x) - 0.5 * math.log(math.pi) + math.log1p(-0.5 * r + 0.75 * r * r - 1.875 * r**3)


def _log_a_int(q: float, sigma: float, alpha: int) -> float:
    log_a = -math.inf
    for i in range(alpha + 1):
        log_binom = math.lgamma(alpha + 1) - math.lgamma(i + 1) - math.lgamma(alpha - i + 1)
        term = log_binom + i * math.log(q) + (alpha - i) * math.log1p(-q) + (i * i - i) / (2 * (sigma * sigma))
        log_a = _log_add(log_a, term)
    return log_a


def _log_a_frac(q: float, sigma: float, alpha: float) -> float:
    """The two-series formula for fractional orders (Mironov, Talwar & Zhang 2019, Section 3.3)."""
    log_a0 = log_a1 = -math.inf
    z0 = (sigma * sigma) * math.log(1 / q - 1) + 0.5
    coef = 1.0  # binom(alpha, i), built up multiplicatively (its sign alternates past i > alpha)
    i = 0
    while True:
        j = alpha - i
        log_coef = math.log(abs(coef))
        log_t0 = log_coef + i * math.log(q) + j * math.log1p(-q)
        log_t1 = log_coef + j * math.log(q) + i * math.log1p(-q)
        log_e0 = math.log(0.5) + _log_erfc((i - z0) / (math.sqrt(2) * sigma))
        log_e1 = math.log(0.5) + _log_erfc((z0 - j) / (math.sqrt(2) * sigma))
        log_s0 = log_t0 + (i * i - i) / (2 * (sigma * sigma)) + log_e0
        log_s1 = log_t1 + (j * j - j) / (2 * (sigma * sigma)) + log_e1
        if coef > 0:
            log_a0, log_a1 = _log_add(log_a0, log_s0), _log_add(log_a1, log_s1)
        else:
            log_a0, log_a1 = _log_sub(log_a0, log_s0), _log_sub(log_a1, log_s1)
        i += 1
        if max(log_s0, log_s1) < -30:
            break
        if math.isnan(log_s0) or math.isnan(log_s1) or i > _MAX_SERIES_TERMS:  # never loop forever
            raise ValueError(
                f"RDP accountant: the series for noise_multiplier={sigma}, sample_rate={q}, order {alpha} does not "
                "converge"
            )
        coef *= (alpha - (i - 1)) / i
    return _log_add(log_a0, log_a1)


def rdp_sampled_gaussian(q: float, sigma: float, steps: int, alphas: list[float]) -> list[float]:
    """RDP of ``steps`` compositions of the sampled Gaussian mechanism, one value per order."""
    out = []
    for a in alphas:
        if q == 0 or math.isinf(sigma * sigma):  # no sampling, or noise beyond float range: no privacy loss
            out.append(0.0)
        elif sigma == 0:
            out.append(math.inf)
        elif q == 1.0:
            out.append(steps * a / (2 * (sigma * sigma)))
        else:
            log_a = _log_a_int(q, sigma, int(a)) if float(a).is_integer() else _log_a_frac(q, sigma, a)
            out.append(steps * log_a / (a - 1))
    return out


def rdp_to_epsilon(rdp: list[float], alphas: list[float], delta: float, conversion: str = "improved"):
    """Smallest ε over the orders, and the order achieving it."""
    best, best_alpha = math.inf, None
    for r, a in zip(rdp, alphas):
        if conversion == "improved":
            eps = r - (math.log(delta) + math.log(a)) / (a - 1) + math.log((a - 1) / a)
        elif conversion == "classic":
            eps = r - math.log(delta) / (a - 1)
        else:
            raise ValueError(f"unknown RDP conversion {conversion!r}; use 'improved' or 'classic'")
        if eps < best:
            best, best_alpha = eps, a
    return max(best, 0.0), best_alpha


def _check_mechanism(owner: str, noise_multiplier, sample_rate, steps) -> None:
    def real(v):
        return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)

    if not (real(noise_multiplier) and noise_multiplier >= 0):
        raise ValueError(f"{owner}: expected a finite noise_multiplier >= 0, but got {noise_multiplier!r}")
    if not (real(sample_rate) and 0 <= sample_rate <= 1):
        raise ValueError(f"{owner}: expected sample_rate in [0, 1], but got {sample_rate!r}")
    if not (isinstance(steps, numbers.Integral) and not isinstance(steps, bool) and steps >= 0):
        raise ValueError(f"{owner}: expected steps to be a non-negative integer, but got {steps!r}")


# -------------------------------------------------------------------------------------------------- accountants
class Accountant:
    """Records the mechanism applied at each step; subclasses turn the history into ε for a δ.

    Example:
        >>> acc = make_accountant('rdp')
        >>> acc.step(noise_multiplier=1.0, sample_rate=0.01, steps=1000)
        >>> acc.get_epsilon(delta=1e-5)
    """

    name = "base"

    def __init__(self):
        self.history: list[tuple[float, float, int]] = []  # (noise_multiplier, sample_rate, steps)

    def step(self, noise_multiplier: float, sample_rate: float, steps: int = 1) -> None:
        """Records ``steps`` steps of the sampled Gaussian mechanism (checked: a finite noise multiplier >= 0, a
        sample rate in [0, 1], a non-negative integer step count)."""
        _check_mechanism(type(self).__name__ + ".step", noise_multiplier, sample_rate, steps)
        if self.history and self.history[-1][:2] == (noise_multiplier, sample_rate):
            sigma, q, n = self.history[-1]
            self.history[-1] = (sigma, q, n + steps)
        else:
            self.history.append((noise_multiplier, sample_rate, steps))

    @property
    def steps(self) -> int:
        return sum(n for _, _, n in self.history)

    def get_epsilon(self, delta: float, history=None) -> float:
        raise NotImplementedError  # pragma: no cover - abstract

    def state_dict(self) -> dict:
        return {"history": list(self.history)}

    def load_state_dict(self, state: dict) -> None:
        self.history = [tuple(h) for h in state["history"]]


class RDPAccountant(Accountant):
    """Rényi-DP accounting of the subsampled Gaussian mechanism (see the module docstring): a provable upper bound
    on epsilon, the accountant Opacus and TensorFlow Privacy use.

    Args:
        alphas: Rényi orders to evaluate (a default grid from 1.01 to 10000).
        conversion: RDP -> (epsilon, delta) conversion, ``'improved'`` (Balle et al. 2020) or ``'classic'``.

    Example:
        >>> acc = RDPAccountant()
        >>> acc.step(noise_multiplier=1.1, sample_rate=256 / 60000, steps=15 * 235)
        >>> acc.get_epsilon(delta=1e-5)
    """

    name = "rdp"

    def __init__(self, alphas: list[float] | None = None, conversion: str = "improved"):
        super().__init__()
        self.alphas = list(alphas or DEFAULT_ALPHAS)
        self.conversion = conversion

    def get_epsilon(self, delta: float, history=None) -> float:
        return self.get_epsilon_and_order(delta, history)[0]

    def get_epsilon_and_order(self, delta: float, history=None):
        total = [0.0] * len(self.alphas)
        for sigma, q, n in self.history if history is None else history:
            total = [t + r for t, r in zip(total, rdp_sampled_gaussian(q, sigma, n, self.alphas))]
        return rdp_to_epsilon(total, self.alphas, delta, self.conversion)


class PRVAccountant(Accountant):
    """Numerical composition of the privacy-loss distribution (see the module docstring).

    Args:
        grid_points: FFT size; more points, a finer grid.
        width_sigmas: the composed loss is represented within this many standard deviations of its mean.

    Example:
        >>> acc = PRVAccountant()
        >>> acc.step(noise_multiplier=1.1, sample_rate=256 / 60000, steps=15 * 235)
        >>> acc.get_epsilon(delta=1e-5)
    """

    name = "prv"

    def __init__(self, grid_points: int = 1 << 20, width_sigmas: float = 60.0):
        super().__init__()
        self.grid_points = grid_points
        self.width_sigmas = width_sigmas
        self._cache: tuple | None = None

    @staticmethod
    def _loss(q: float, sigma: float, direction: int):
        """(cdf(t), moments) of one step's privacy loss. direction 0: x ~ P = (1-q) N(0,s²) + q N(1,s²), loss
        L(x) = log(P(x)/Q(x)); direction 1: x ~ Q = N(0,s²), loss -L(x)."""
        f64 = torch.float64
        low = math.log1p(-q)

        def phi(z):
            return 0.5 * torch.erfc(-z / math.sqrt(2))

        def x_of(t):  # inverse of L(x) = log(1 - q + q exp((2x - 1) / (2 s²)))
            return (sigma * sigma) * torch.log(((torch.exp(t) - (1 - q)) / q).clamp_min(1e-300)) + 0.5

        if direction == 0:

            def cdf(t):
                x = x_of(t)
                c = (1 - q) * phi(x / sigma) + q * phi((x - 1) / sigma)
                return torch.where(t <= low, torch.zeros_like(t), c)
        else:

            def cdf(t):
                c = 1 - phi(x_of(-t) / sigma)
                return torch.where(-t <= low, torch.ones_like(t), c)

        # Mean and variance of the loss by quadrature over x.
        x = torch.linspace(-16 * sigma, 1 + 16 * sigma, 400001, dtype=f64)
        loss = torch.logaddexp(torch.tensor(low, dtype=f64), math.log(q) + (2 * x - 1) / (2 * (sigma * sigma)))
        dens = torch.exp(-0.5 * (x / sigma) ** 2)
        if direction == 0:
            dens = (1 - q) * dens + q * torch.exp(-0.5 * ((x - 1) / sigma) ** 2)
        else:
            loss = -loss
        dens = dens / dens.sum()
        mean = float((dens * loss).sum())
        var = float((dens * (loss - mean) ** 2).sum())
        return cdf, mean, var

    def _composed(self, history, direction: int):
        """Grid values and probabilities of the composed loss (cached per history)."""
        steps = [(self._loss(q, sigma, direction), n) for sigma, q, n in history]
        mean = sum(n * m for (_, m, _), n in steps)
        std = math.sqrt(sum(n * v for (_, _, v), n in steps))
        size = self.grid_points
        h = 2 * (self.width_sigmas * std + 1.0) / size
        k = torch.fft.fftfreq(size, d=1.0 / size).to(torch.float64)  # signed grid indices 0, 1, ..., -1
        spectrum = torch.ones(size, dtype=torch.complex128)
        for (cdf, m, _), n in steps:
            # One step's loss minus its mean, rounded to the nearest grid point, wrapped onto the circle.
            pmf = (cdf(k * h + h / 2 + m) - cdf(k * h - h / 2 + m)).clamp_min(0.0)
            spectrum = spectrum * torch.fft.fft(pmf) ** n
        probs = torch.fft.ifft(spectrum).real.clamp_min(0.0)
        return k * h + mean, probs

    def _deltas(self, history):
        key = tuple(history)
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, [self._composed(history, d) for d in (0, 1)])
        dists = self._cache[1]
        return lambda eps: max(float((p * (1 - torch.exp(eps - v)).clamp_min(0.0)).sum()) for v, p in dists)

    def get_epsilon(self, delta: float, history=None) -> float:
        history = self.history if history is None else history
        # Steps without sampling or with noise beyond float range lose no privacy (and would overflow the grid).
        history = [(sigma, q, n) for sigma, q, n in history if q > 0 and n > 0 and not math.isinf(sigma * sigma)]
        if not history:
            return 0.0
        delta_of = self._deltas(history)
        lo, hi = 0.0, 1.0
        while delta_of(hi) > delta:
            lo, hi = hi, hi * 2
            if hi > 1e4:
                return math.inf
        while hi - lo > 1e-4 * max(hi, 1e-2):  # bisection, far below 2 significant digits
            mid = (lo + hi) / 2
            if delta_of(mid) > delta:
                lo = mid
            else:
                hi = mid
        return hi


_ACCOUNTANTS = {"rdp": RDPAccountant, "prv": PRVAccountant}


def register_accountant(name: str, cls: type[Accountant]) -> None:
    """Makes ``DifferentialPrivacy(accountant=name)`` use ``cls``.

    Example:
        >>> register_accountant('mine', MyAccountant)
        >>> dp = DifferentialPrivacy(epsilon=1.0, delta=1e-5, noise_multiplier=1.0, accountant='mine')
    """
    _ACCOUNTANTS[name] = cls


def make_accountant(name: str) -> Accountant:
    """A new accountant by registered name (``'rdp'``, ``'prv'`` or one added with :func:`register_accountant`).

    Example:
        >>> acc = make_accountant("prv")
    """
    if name not in _ACCOUNTANTS:
        raise ValueError(f"unknown accountant {name!r}; available: {sorted(_ACCOUNTANTS)}")
    return _ACCOUNTANTS[name]()


def get_noise_multiplier(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "rdp",
    precision: float = 0.001,
) -> float:
    """Smallest noise multiplier whose ``steps`` steps at ``sample_rate`` stay within (target_epsilon, delta).

    Example:
        >>> sigma = get_noise_multiplier(target_epsilon=1.0, delta=1e-5, sample_rate=0.01, steps=1000)
    """
    acc = make_accountant(accountant)

    def eps(sigma):
        return acc.get_epsilon(delta, [(sigma, sample_rate, steps)])

    lo, hi = 0.0, 1.0
    while eps(hi) > target_epsilon:
        lo, hi = hi, hi * 2
        if hi > 1e4:
            raise ValueError(
                f"cannot reach epsilon={target_epsilon} at delta={delta} with sample rate "
                f"{sample_rate} over {steps} steps (noise multiplier would exceed 1e4)"
            )
    while hi - lo > precision:
        mid = (lo + hi) / 2
        if eps(mid) > target_epsilon:
            lo = mid
        else:
            hi = mid
    return hi
