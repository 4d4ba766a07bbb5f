"""`cafs ui`: a read-only web view of a store (executions, layers, artifacts and their history,
contents, sharing between runs, what gc would reclaim), served on localhost.

Modules: source (where answers come from: the daemon's control socket when mounted, a
read-only manifest when not; the background summary), plots (SVG drawn here), pages (one
function per page, Jinja2 templates), peers (which local user connected: root and the UI's own
user only), server (HTTP: GET only, headers, downloads). Every SQL
statement it runs is in cafs.sqlite_manifest.ui_queries. No trio, no pyfuse3: `cafs ui` never
loads the daemon.
"""
