"""deploy_app: download an app from a URL, check it, publish it atomically as the app's next release,
record its URL, and roll the app's running instances onto it (``instances.rollout``)."""

from __future__ import annotations

import asyncio
import shutil
from dataclasses import replace
from typing import Any

from .. import keys
from ..names import check_name
from . import apps, profile, quotas, releases
from .context import Context
from .fetch import fetch
from .instances import rollout


async def deploy_app(ctx: Context, user: str, app: str, url: str, batch: int | None = None) -> dict[str, Any]:
    check_name(user, "user name")
    check_name(app, "app name")
    settings = ctx.settings
    # Everything this job writes before publishing lives in one folder of its own, so an attempt
    # that died (worker killed) leaves nothing that the next attempt cannot remove whole.
    work = apps.staging_dir(settings, user) / f"{app}-{ctx.job_id}"
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    staged = work / "app"
    await ctx.log(f"deploying {url} as {user}_{app}")
    try:
        summary = await fetch(
            url,
            staged,
            settings=settings,
            log=ctx.log,
            check=ctx.check,
            progress=lambda done, total: ctx.progress(done, total or done, phase="downloaded"),
        )
        spec = profile.load(staged)
        profile.validate(spec)
        digest = await asyncio.to_thread(releases.digest, staged)
        await ctx.check()
        # Under the user's quota lock, so that two deploys at once count each other: the staged copy
        # counts (it is in the user's folder), the releases pruned after it are about to go.
        async with quotas.held(ctx.store, user, ctx.job_id):
            new_app = not apps.app_path(settings, user, app).is_dir()
            touched = ("apps", "disk") if new_app else ("disk",)
            # Independent reads, at once: the app's releases (read once, for its number and for what
            # pruning frees), the user's usage and the user's limits.
            known, used, limit = await asyncio.gather(
                releases.records(ctx.store, user, app),
                quotas.usage(ctx.store, settings, user),
                quotas.limits(ctx.store, settings, user),
            )
            n = await releases.next_number(ctx.store, settings, user, app, ctx.job_id, known)
            freed = await releases.pruned_size(ctx.store, settings, user, app, n, known)
            # quotas.ensure_within, on what was just read: the staged copy counts (it is in the user's
            # folder), less what pruning frees, with the app it adds.
            quotas.within(limit, replace(used, disk=used.disk - freed, apps=used.apps + int(new_app)), touched)
            releases.publish(settings, user, app, staged, n)
            # The release's record and the app's URL in one round trip.
            known[n] = await releases.record(
                ctx.store,
                user,
                app,
                n,
                also={keys.URL.format(user=user, app=app): url},
                url=url,
                digest=digest,
                job=ctx.job_id,
                **_sizes(summary),
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    path = apps.app_path(settings, user, app)
    await ctx.log(f"published {spec.filename} app at {path} as release v{n} ({digest[:19]})")
    await ctx.log(f"wrote {keys.URL.format(user=user, app=app)} = {url}")
    rolled: dict[str, Any] = {}
    if spec.kind == "common":  # a rollout that stops fails the job before any release is pruned
        rolled = await rollout.roll(ctx, user, app, n, batch)
    pruned = await releases.prune(ctx.store, settings, user, app, known)
    if pruned:
        await ctx.log(f"pruned release(s) {', '.join(f'v{p}' for p in pruned)}")
    return {
        "app": app,
        "service": f"{user}_{app}",
        "url": url,
        "path": str(path),
        "kind": spec.kind,
        "parameters": spec.parameters,
        **_sizes(summary),
        "source": summary.get("kind"),
        "release": f"v{n}",
        "digest": digest,
        "rollout": rolled,
    }


def _sizes(summary: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in summary.items() if k in ("files", "bytes")}
