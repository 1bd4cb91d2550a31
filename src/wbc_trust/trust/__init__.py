"""Trust methods: robustness, Grad-CAM, Fisher sensitivity, influence, calibration and prediction sets, OOD, audit,
and the report that runs them all. Each module exposes one ``run_*`` function that writes its files and returns a
JSON-able summary; ``trust/methods.py`` lists them (``TRUST_METHODS``), and from that list ``trust/cli.py`` makes the
``wbc trust ...`` commands and ``trust/report.py`` the report."""
