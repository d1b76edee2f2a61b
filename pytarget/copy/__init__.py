"""Third-party copy manager: EXTENDED COPY, RECEIVE COPY RESULTS and ROD tokens."""
