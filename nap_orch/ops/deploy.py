"""deploy_app: download an app from a URL, check it, publish it atomically, record its URL."""

from __future__ import annotations

import shutil
from typing import Any

from .. import keys
from ..names import check_name
from . import apps, profile, quotas
from .context import Context
from .fetch import fetch


async def deploy_app(ctx: Context, user: str, app: str, url: str) -> dict[str, Any]:
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
        await ctx.check()
        # Under the user's quota lock, so that two deploys at once count each other: the staged copy
        # counts (it is in the user's folder), the version it replaces is about to go.
        async with quotas.held(ctx.store, user, ctx.job_id):
            new_app = not apps.app_path(settings, user, app).is_dir()
            touched = ("apps", "disk") if new_app else ("disk",)
            old = await quotas.app_size(settings, user, app)
            await quotas.ensure_within(ctx.store, settings, user, touched, less_disk=old, more_apps=int(new_app))
            apps.publish(settings, user, app, staged, ctx.job_id)
            await ctx.store.put(keys.URL.format(user=user, app=app), url)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    path = apps.app_path(settings, user, app)
    await ctx.log(f"published {spec.filename} app at {path}")
    await ctx.log(f"wrote {keys.URL.format(user=user, app=app)} = {url}")
    return {
        "app": app,
        "service": f"{user}_{app}",
        "url": url,
        "path": str(path),
        "kind": spec.kind,
        "parameters": spec.parameters,
        **{k: v for k, v in summary.items() if k in ("files", "bytes")},
        "source": summary.get("kind"),
    }
