"""The web dashboard of the HTTP side (docs/dashboard.md): server-rendered pages
(`pages`, `fleet`, `render`) and one small hand-written script (`static/dashboard.js`) that
follows a sandbox's log and refreshes its charts. No build step, nothing fetched from
elsewhere: the charts are inline SVG."""

from aviato.server.dashboard.pages import OWNER, Dashboard

__all__ = ["OWNER", "Dashboard"]
