"""End-to-end tests in a real browser: the OHIF viewer on the gateway, in headless Chromium."""
