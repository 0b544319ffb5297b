"""``python -m analysis.figures TRACE --out DIR``: every panel from an exported trace (`analysis.panels`)."""

from analysis.panels import main

raise SystemExit(main())
