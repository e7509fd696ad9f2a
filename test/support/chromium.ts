// Debian's Chromium, driven by playwright-core (`npx playwright install`
// cannot download a browser here). Tests that need it skip without it and
// say how to install it; .ci/run installs it.

import fs from 'node:fs';

export const CHROMIUM = '/usr/bin/chromium';
export const HAVE_CHROMIUM = fs.existsSync(CHROMIUM);
export const INSTALL_CHROMIUM = `no ${CHROMIUM}: install Chromium with \`apt-get install -y chromium\` to run the browser test`;

// Headless, and quiet: without the background-networking flags Chromium
// floods the closed network with connection attempts.
export const CHROMIUM_ARGS = [
  '--headless',
  '--no-sandbox',
  '--disable-gpu',
  '--disable-quic',
  '--no-first-run',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
];
