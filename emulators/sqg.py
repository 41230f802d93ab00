"""Two-boundary surface quasi-geostrophic (SQG) turbulence, after Tulloch & Smith (2009) and the
data-assimilation set-up of J. Whitaker's `sqgturb` (used by the EnSF papers).

Uniform potential vorticity (zero) in the interior, constant N² and f, rigid boundaries at z = 0 and
z = H; the prognostic fields are the potential-temperature anomalies θ' (K) on the two boundaries,
advected by the geostrophic flow they induce. Doubly periodic square of side L, pseudo-spectral with
`torch.fft`, RK4, quadratic terms dealiased by the 2/3 rule, order-8 hyperdiffusion applied
as an integrating factor after each step (e-folding time `diffusion_efold` at the largest *retained*
wavenumber kmax, not at the grid cutoff: that would leave the retained small scales nearly undamped), and Newtonian relaxation (`relaxation_time`) towards an unstable equilibrium jet of
shear `jet_speed` (sqgturb's symmetric jet: u = ∓U/2 sin(2πy/L) at the bottom/top).

Units: state in K (θ' = f θ0 / g · ψ_z, the deviation from θ0 + θ0 N² z / g), time in seconds,
internal streamfunction in m² s⁻¹. The Rossby radius is Lr = N H / f (1000 km by default) and the
default domain L = 20 Lr. The state is (member, 2, y, x) in physical space, float32 or float64.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from emulators.base import Variable
from emulators.registry import register_model
from twin.domain import Decomposition, Grid


@register_model("sqg")
class SQG:
    """The 2-level SQG model (`kind: sqg`). Time unit: seconds.

    `halo = 0`: the model is spectral, so it is not local. Under MPI (domain.size > 1) each step
    gathers the ensemble to rank 0, steps it there and scatters the blocks back; fine for the 64 x 64
    DA configuration, a serial bottleneck for large grids.
    """

    @dataclass(frozen=True)
    class Config:
        size: int = field(default=64, metadata={"min": 8, "help": "grid points per side (even)"})
        dt: float = field(default=1200.0, metadata={"gt": 0, "help": "RK4 time step (s)"})
        diffusion_efold: float = field(default=86400.0, metadata={
            "min": 0, "help": "hyperdiffusion e-folding time (s) at the largest retained wavenumber; 0 = off"})
        diffusion_order: int = field(default=8, metadata={"min": 2, "help": "order of the hyperdiffusion"})
        relaxation_time: float = field(default=864000.0, metadata={
            "min": 0, "help": "thermal relaxation time (s) towards the jet; 0 = off"})
        jet_speed: float = field(default=30.0, metadata={"help": "equilibrium jet shear U (m/s)"})
        dealias: Literal["truncate", "pad"] = field(default="truncate", metadata={
            "help": "2/3 rule: keep wavenumbers up to (size-1)//3 and form products on the grid, or keep "
                    "up to size/2-1 and form products on a 3/2 zero-padded grid (as sqgturb; slower)"})
        coriolis: float = field(default=1e-4, metadata={"gt": 0, "help": "Coriolis parameter f (1/s)"})
        brunt_vaisala_squared: float = field(default=1e-4, metadata={"gt": 0, "help": "N^2 (1/s^2)"})
        height: float = field(default=10e3, metadata={"gt": 0, "help": "lid height H (m)"})
        length: float = field(default=20e6, metadata={"gt": 0, "help": "domain side L (m); 20 Lr, Lr = N H / f"})
        theta0: float = field(default=300.0, metadata={"gt": 0, "help": "reference potential temperature (K)"})
        gravity: float = field(default=9.8, metadata={"gt": 0, "help": "gravity g (m/s^2)"})

    halo = 0
    time_unit_seconds = 1.0
    variables = (
        Variable("theta_bottom", "K", "potential temperature anomaly at the lower boundary (z = 0)"),
        Variable("theta_top", "K", "potential temperature anomaly at the upper boundary (z = H)"),
    )

    def __init__(self, config: "SQG.Config", domain: Decomposition, dtype: torch.dtype = torch.float64):
        self.validate(config)
        self.config, self.domain, self.grid, self.dtype = config, domain, domain.grid, dtype
        self.dt = float(config.dt)
        c = config
        n = self.n = c.size
        self.m = 3 * n // 2 if c.dealias == "pad" else n  # grid of the products
        kmax = self.kmax = n // 2 - 1 if c.dealias == "pad" else (n - 1) // 3  # largest retained index
        cdtype = torch.complex128 if dtype == torch.float64 else torch.complex64
        # compact spectra: rows ky = 0..kmax, -kmax..-1 and columns kx = 0..kmax (norm="forward")
        self.ky_index = torch.cat((torch.arange(kmax + 1), torch.arange(-kmax, 0))).double()
        self.kx_index = torch.arange(kmax + 1).double()
        scale = 2 * math.pi / c.length
        ky, kx = torch.meshgrid(self.ky_index * scale, self.kx_index * scale, indexing="ij")
        ktot = (kx**2 + ky**2).sqrt()
        self.ksq = (ktot**2).to(dtype)
        self.ik, self.il = (1j * kx).to(cdtype), (1j * ky).to(cdtype)
        # inversion ψ0 = B θ1 − A θ0, ψ1 = A θ1 − B θ0 with A = H/(μ tanh μ) g/(f θ0), B = same/sinh μ
        mu = ktot * math.sqrt(c.brunt_vaisala_squared) * c.height / c.coriolis
        mu[0, 0] = 1.0
        to_pv = c.gravity / (c.coriolis * c.theta0)
        a, b = c.height / (mu * torch.tanh(mu)) * to_pv, c.height / (mu * torch.sinh(mu)) * to_pv
        a[0, 0] = b[0, 0] = 0.0  # the mean θ induces no flow
        self.inv_a, self.inv_b = a.to(dtype), b.to(dtype)
        damp = torch.ones_like(ktot)  # integrating factor of the hyperdiffusion
        if c.diffusion_efold > 0:
            damp = torch.exp(-(self.dt / c.diffusion_efold) * (ktot / (kmax * scale)) ** c.diffusion_order)
        self.damp = damp.to(dtype)
        self.relax = 1.0 / c.relaxation_time if c.relaxation_time > 0 else 0.0
        self.theta_eq_spec = self._spec(self.equilibrium(c, dtype))

    # ------------------------------------------------------------ construction helpers

    @staticmethod
    def validate(config: "SQG.Config") -> None:
        if config.size % 2:
            raise ValueError(f"sqg: size must be even (got {config.size})")

    @staticmethod
    def global_grid(config: "SQG.Config") -> Grid:
        """An index grid (spacing 1 = L / size, i.e. 312.5 km by default): distances in grid points."""
        return Grid(shape=(config.size, config.size), periodic=(True, True), dims=("y", "x"), units="1")

    @staticmethod
    def equilibrium(config: "SQG.Config", dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """The relaxation state θ_eq (2, y, x) in K: sqgturb's symmetric jet, uniform in x."""
        c, n = config, config.size
        l = 2 * math.pi / c.length
        mu = l * math.sqrt(c.brunt_vaisala_squared) * c.height / c.coriolis
        amp = (mu * 0.5 * c.jet_speed / (l * c.height)) / math.tanh(0.5 * mu) * c.coriolis * c.theta0 / c.gravity
        y = torch.arange(n, dtype=torch.float64) * (c.length / n)
        prof = -amp * torch.cos(l * y)
        return prof[None, :, None].expand(2, n, n).to(dtype).clone()

    symmetry_count = 8

    @staticmethod
    def symmetry(index: int, theta: torch.Tensor) -> torch.Tensor:
        """Element `index` (0-7) of the dynamics' exact symmetry group, applied to whole fields (..., 2, y, x).

        With the symmetric jet θ_eq ∝ −cos(2πy/L) (both levels; so θ_eq(y + L/2) = −θ_eq(y) = −θ_eq(−y)) and
        isotropic inversion, dissipation and dealiasing, the model commutes with three generators, each an
        involution and with each other (bits of `index`, applied in this order):
          1: θ(x, y) ↦ −θ(−x, y + L/2)  (mirror in x: u ↦ −u, the jet's direction restored by the shift)
          2: θ(x, y) ↦ −θ(x, L/2 − y)   (mirror in y)
          4: (θ_b, θ_t) ↦ −(θ_t, θ_b)(y + L/2)  (z ↦ H − z: the lids swap)
        so every element is its own inverse; 0 is the identity (tests/test_sqg.py checks step ∘ g = g ∘ step)."""
        n = theta.shape[-2]
        if index & 1:
            theta = -theta.flip(-1).roll((1, n // 2), (-1, -2))
        if index & 2:
            theta = -theta.flip(-2).roll(1 + n // 2, -2)
        if index & 4:
            theta = -theta.flip(-3).roll(n // 2, -2)
        return theta

    def initial_state(self, noise: torch.Tensor) -> torch.Tensor:
        """The twin's truth start: the equilibrium jet plus unit white noise (local block, K); the
        noise seeds baroclinic instability (spin up ~100 days)."""
        jet = self.equilibrium(self.config, noise.dtype)[(Ellipsis,) + tuple(self.domain.local_slices)]
        return jet + noise

    @staticmethod
    def seeded_state(config: "SQG.Config", seed: int, members: int = 1, perturbation: float = 1.0,
                     dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """Global (members, 2, y, x): the equilibrium jet + white noise of std `perturbation` K drawn
        from numpy's Generator(seed); the noise seeds baroclinic instability (spin up ~100 days)."""
        rng = np.random.default_rng(seed)
        noise = torch.from_numpy(rng.standard_normal((members, 2, config.size, config.size)))
        noise = noise - noise.mean(dim=(-2, -1), keepdim=True)
        return (SQG.equilibrium(config)[None] + perturbation * noise).to(dtype)

    # ------------------------------------------------------------ spectral machinery

    def _spec(self, x: torch.Tensor) -> torch.Tensor:
        """Compact retained spectrum (..., 2K+1, K+1) of a real field (..., s, s), s = n or m."""
        k = self.kmax
        f = torch.fft.rfft(x, dim=-1, norm="forward")[..., : k + 1]
        f = torch.fft.fft(f, dim=-2, norm="forward")
        return torch.cat((f[..., : k + 1, :], f[..., -k:, :]), dim=-2)

    def _grid(self, s: torch.Tensor, size: int | None = None) -> torch.Tensor:
        """Real field on a size x size grid (default n; m for products) from a compact spectrum."""
        size, k = size or self.n, self.kmax
        buf = s.new_zeros(s.shape[:-2] + (size, k + 1))
        buf[..., : k + 1, :] = s[..., : k + 1, :]
        buf[..., size - k :, :] = s[..., k + 1 :, :]
        return torch.fft.irfft(torch.fft.ifft(buf, dim=-2, norm="forward"), n=size, dim=-1, norm="forward")

    def invert(self, th: torch.Tensor) -> torch.Tensor:
        """Streamfunction spectrum (m² s⁻¹) on both boundaries from the θ' spectrum (..., 2, ky, kx)."""
        t0, t1 = th[..., 0, :, :], th[..., 1, :, :]
        return torch.stack((self.inv_b * t1 - self.inv_a * t0, self.inv_a * t1 - self.inv_b * t0), dim=-3)

    def tendency(self, th: torch.Tensor) -> torch.Tensor:
        """dθ'/dt in spectral space: −J(ψ, θ') (dealiased) + relaxation to the jet."""
        psi = self.invert(th)
        d = th.new_empty((4,) + th.shape)
        torch.mul(self.ik, psi, out=d[0])
        torch.mul(self.il, psi, out=d[1])
        torch.mul(self.ik, th, out=d[2])
        torch.mul(self.il, th, out=d[3])
        g = self._grid(d, self.m)
        jac = g[0] * g[3] - g[1] * g[2]  # ψ_x θ_y − ψ_y θ_x = u θ_x + v θ_y
        out = self._spec(jac).neg_()
        if self.relax:
            out += self.relax * (self.theta_eq_spec - th)
        return out

    def step_spectral(self, th: torch.Tensor) -> torch.Tensor:
        """One RK4 step of the spectral state, then the hyperdiffusion/truncation factor."""
        dt = self.dt
        k1 = self.tendency(th)
        k2 = self.tendency(th + 0.5 * dt * k1)
        k3 = self.tendency(th + 0.5 * dt * k2)
        k4 = self.tendency(th + dt * k3)
        return (th + (dt / 6.0) * (k1 + 2.0 * k2 + 2.0 * k3 + k4)) * self.damp

    def step(self, ens: torch.Tensor, t: float = 0.0) -> torch.Tensor:
        """One step of length dt for the local ensemble (member, 2, y, x) in K (autonomous: t unused)."""
        if self.domain.size > 1:
            full = self.domain.gather(ens)
            out = None if full is None else self._grid(self.step_spectral(self._spec(full.to(ens.dtype))))
            return self.domain.scatter(out).to(ens.dtype)
        return self._grid(self.step_spectral(self._spec(ens)))

    def integrate(self, ens: torch.Tensor, steps: int) -> torch.Tensor:
        """`steps` steps staying in spectral space (serial; for spin-ups and diagnostics)."""
        s = self._spec(ens)
        for _ in range(steps):
            s = self.step_spectral(s)
        return self._grid(s)

    # ------------------------------------------------------------ diagnostics (global fields)

    def winds(self, ens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Geostrophic (u, v) in m/s on both boundaries, each (..., 2, y, x)."""
        psi = self.invert(self._spec(ens))
        return self._grid(-self.il * psi), self._grid(self.ik * psi)

    def _weights(self) -> torch.Tensor:
        """Column weights so that sums over the half-plane cover the full spectrum (Parseval)."""
        w = torch.full((self.kmax + 1,), 2.0, dtype=self.ksq.dtype)
        w[0] = 1.0
        return w

    def energy(self, ens: torch.Tensor) -> torch.Tensor:
        """Total (kinetic + available potential) energy per unit area and unit density, m³ s⁻²:
        E = f²/(2N²) · mean(ψ(H) ψ_z(H) − ψ(0) ψ_z(0)), ψ_z = g θ'/(f θ0); conserved by the advection."""
        c = self.config
        th = self._spec(ens)
        psi = self.invert(th)
        pv = th * (c.gravity / (c.coriolis * c.theta0))
        prod = (psi[..., 1, :, :] * pv[..., 1, :, :].conj() - psi[..., 0, :, :] * pv[..., 0, :, :].conj()).real
        return c.coriolis**2 / (2 * c.brunt_vaisala_squared) * (prod * self._weights()).sum(dim=(-2, -1))

    def variance(self, ens: torch.Tensor) -> torch.Tensor:
        """Spatial variance of θ' per boundary (..., 2) in K², from the retained modes."""
        th = self._spec(ens)
        th[..., 0, 0] = 0
        return (th.abs() ** 2 * self._weights()).sum(dim=(-2, -1))

    def ke_spectrum(self, ens: torch.Tensor, level: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Isotropic kinetic-energy spectrum at one boundary: (integer wavenumbers 1..kmax, E(k)),
        averaged over any leading dimensions (shells beyond kmax, the square's corners, left out)."""
        psi = self.invert(self._spec(ens))[..., level, :, :]
        dens = self._weights() * self.ksq * psi.abs() ** 2 / 2
        dens = dens.reshape(-1, *dens.shape[-2:]).mean(0)
        shell = (self.ky_index[:, None] ** 2 + self.kx_index[None, :] ** 2).sqrt().round().long()
        spec = torch.zeros(int(shell.max()) + 1, dtype=torch.float64).index_add_(
            0, shell.flatten(), dens.flatten().double())
        k = torch.arange(1, self.kmax + 1)
        return k, spec[1 : self.kmax + 1]
