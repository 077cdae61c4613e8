"""Probes that act on several sites at once (e.g. every cross-attention layer), on top of ProbeEngine.

The engine's `Probe` names one site. P1 also swaps components of *all* cross-attention layers at once, so
`SiteGroupProbe` carries a tuple of sites, and `grouped(engine)` returns a view of the engine (same model,
runs and state) that hands each site the member probe for that site. All arithmetic stays the engine's:
a group probe is exactly the per-site probes applied together in one batch row.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from ..probe import Probe, ProbeEngine


@dataclass(frozen=True)
class SiteGroupProbe(Probe):
    """The same intervention at every site of `sites` (site = the first of them, for the engine)."""

    sites: tuple = ()
    scope: str = "all layers"  # shown in the results' `site` column

    def __post_init__(self):
        if not self.sites or any(not isinstance(s, str) for s in self.sites):
            raise ValueError("sites must be a non-empty tuple of site names")
        object.__setattr__(self, "sites", tuple(self.sites))
        if self.site != self.sites[0]:
            raise ValueError("site must be the first of sites")
        super().__post_init__()

    @classmethod
    def over(cls, sites, scope: str = "all layers", **probe_fields) -> "SiteGroupProbe":
        sites = tuple(sites)
        return cls(site=sites[0], sites=sites, scope=scope, **probe_fields)

    def at(self, site: str):
        """The plain Probe acting at `site`, or None if `site` is not in the group."""
        if site not in self.sites:
            return None
        base = {f.name: getattr(self, f.name) for f in fields(Probe)}
        return Probe(**dict(base, site=site))

    def describe(self) -> dict:
        row = super().describe()
        row.update(site=self.scope, layer=-1, probe_id=self.probe_id)
        return row


class GroupedEngine(ProbeEngine):
    """A view of a ProbeEngine that understands SiteGroupProbe rows (shares the engine's state)."""

    def __init__(self, engine: ProbeEngine):  # noqa: D401 - deliberately no super().__init__
        # Share the attribute dict: registered runs, sites and the live site context are the engine's own.
        self.__dict__ = engine.__dict__

    def _row_arguments(self, site, q, v, segments):
        ctx = self._ctx
        rows = ctx.rows
        ctx.rows = [p.at(site) if isinstance(p, SiteGroupProbe) else p for p in rows]
        try:
            return super()._row_arguments(site, q, v, segments)
        finally:
            ctx.rows = rows

    def _check_probe(self, probe, traj) -> None:
        if isinstance(probe, SiteGroupProbe):
            for site in probe.sites:
                super()._check_probe(probe.at(site), traj)
        else:
            super()._check_probe(probe, traj)


def grouped(engine: ProbeEngine) -> GroupedEngine:
    return engine if isinstance(engine, GroupedEngine) else GroupedEngine(engine)


__all__ = ["GroupedEngine", "SiteGroupProbe", "grouped"]
