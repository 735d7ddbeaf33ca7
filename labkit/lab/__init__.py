"""lab: the lab as a whole: reproduce (papermill), the site, bench and the ``labkit`` CLI."""
