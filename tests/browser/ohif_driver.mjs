// Drive the OHIF viewer in headless Chromium (Debian's /usr/bin/chromium, never a downloaded
// browser) with playwright-core, and print one JSON document with what it saw.
//
//   node ohif_driver.mjs '<json plan>'
//
// The plan (built by run_driver in tests/browser/conftest.py):
//   site           the viewer's origin, e.g. http://127.0.0.1:41000
//   record         origin whose requests are recorded (the DICOMweb server), e.g. http://127.0.0.1:42000
//   studyCount     rows the study list must show
//   open           {accession, seriesCount}: the study to select in the list and open with "Basic Viewer"
//   multiframe     {studyUID, seriesUID, scrolls}: the multi-frame instance to open, and how many
//                  mouse-wheel steps to scroll it by
//   outDir         where a screenshot of the page goes when a step fails
//   stepTimeoutMs  the longest wait for any one thing to appear
//   totalTimeoutMs the whole run; past it the results so far are printed and the run ends
//
// The driver only observes; the Python test decides what is right. Whatever happens, stdout gets
// exactly one JSON document: {"ok": bool, "failedStep", "error", ...observations..., "requests",
// "preflights", "corsErrors", "failedRequests", "consoleErrors", "pageErrors", "screenshots"}.

import { chromium } from 'playwright-core';
import path from 'node:path';

const plan = JSON.parse(process.argv[2]);
const result = {
  ok: false,
  failedStep: null,
  error: null,
  webgl: null,
  studyList: null,
  selection: null,
  viewer: null,
  multiframe: null,
  requests: [],
  preflights: [],
  corsErrors: [],
  failedRequests: [],
  consoleErrors: [],
  pageErrors: [],
  screenshots: {},
  steps: [],
};
const started = Date.now();
let printed = false;

function finish(code) {
  if (!printed) {
    printed = true;
    process.stdout.write(JSON.stringify(result) + '\n');
  }
  process.exit(code);
}

// A hard stop that still reports what was seen so far.
setTimeout(() => {
  result.error = result.error || `driver ran out of time (${plan.totalTimeoutMs} ms)`;
  finish(2);
}, plan.totalTimeoutMs).unref();

/** Path with UIDs and patient identifiers replaced, so equal requests group together. */
function template(url) {
  const u = new URL(url);
  const names = { studies: '{study}', series: '{series}', instances: '{instance}', frames: '{frames}' };
  const segs = u.pathname.split('/');
  for (let i = 1; i < segs.length; i++) {
    if (names[segs[i - 1]] && /^[0-9.,]+$/.test(segs[i])) segs[i] = names[segs[i - 1]];
  }
  const query = [...u.searchParams.entries()].map(([k, v]) => {
    if (/^[0-9]+(\.[0-9]+){3,}(,[0-9.]+)*$/.test(v)) v = '{uid}';
    else if (k === '00100020' || k.toLowerCase() === 'patientid') v = '{patient-id}';
    return `${k}=${v}`;
  });
  return segs.join('/') + (query.length ? '?' + query.join('&') : '');
}

async function step(name, fn) {
  const t0 = Date.now();
  try {
    const value = await fn();
    result.steps.push({ name, ms: Date.now() - t0 });
    return value;
  } catch (err) {
    result.failedStep = name;
    result.error = String(err && err.stack ? err.stack : err).slice(0, 4000);
    throw err;
  }
}

// Runs in the page: statistics of the active viewport's canvas pixels.
function canvasStats() {
  const canvas = document.querySelector(
    '[data-cy="viewport-pane"][data-is-active="true"] canvas.cornerstone-canvas')
    || document.querySelector('canvas.cornerstone-canvas');
  if (!canvas || !canvas.width || !canvas.height) return null;
  let ctx = canvas.getContext('2d', { willReadFrequently: true });
  let source = canvas;
  if (!ctx) { // a WebGL canvas: copy it onto a 2D one first
    source = document.createElement('canvas');
    source.width = canvas.width;
    source.height = canvas.height;
    ctx = source.getContext('2d');
    ctx.drawImage(canvas, 0, 0);
  }
  const { data } = ctx.getImageData(0, 0, source.width, source.height);
  const colours = new Map();
  let nonBlack = 0;
  let hash = 0x811c9dc5;
  let minLum = 255;
  let maxLum = 0;
  for (let i = 0; i < data.length; i += 4) {
    const rgb = (data[i] << 16) | (data[i + 1] << 8) | data[i + 2];
    if (colours.size < 4096 || colours.has(rgb)) colours.set(rgb, (colours.get(rgb) || 0) + 1);
    if (rgb !== 0) nonBlack++;
    const lum = (data[i] * 299 + data[i + 1] * 587 + data[i + 2] * 114) / 1000;
    if (lum < minLum) minLum = lum;
    if (lum > maxLum) maxLum = lum;
    hash = Math.imul(hash ^ rgb, 0x01000193) >>> 0;
  }
  const pixels = data.length / 4;
  const top = [...colours.entries()].sort((a, b) => b[1] - a[1]).slice(0, 5)
    .map(([rgb, n]) => ({ rgb: '#' + rgb.toString(16).padStart(6, '0'), share: +(n / pixels).toFixed(4) }));
  return {
    width: canvas.width, height: canvas.height, distinctColours: colours.size,
    nonBlackShare: +(nonBlack / pixels).toFixed(4), minLum: Math.round(minLum), maxLum: Math.round(maxLum),
    hash: hash.toString(16), top,
  };
}

// Runs in the page: the study list's rows (not its filter row, which has inputs).
function studyRows() {
  return [...document.querySelectorAll('tbody tr')]
    .filter(tr => tr.cells.length >= 6 && !tr.querySelector('input, button[aria-label="Reset filters"]'));
}

// Runs in the page: the viewer's "Data Source Connection Error" dialog text, or null.
function dataSourceError() {
  const text = document.body.innerText;
  const at = text.indexOf('Data Source Connection Error');
  return at < 0 ? null : text.slice(at, at + 300).replace(/\s+/g, ' ');
}

// Runs in the page: the texts of the active viewport's corner overlays.
function overlayTexts() {
  const pane = document.querySelector('[data-cy="viewport-pane"][data-is-active="true"]') || document;
  const out = {};
  for (const corner of ['top-left', 'top-right', 'bottom-left', 'bottom-right']) {
    const el = pane.querySelector(`[data-cy="viewport-overlay-${corner}"]`);
    out[corner] = el
      ? [...el.querySelectorAll('.overlay-item')].map(e => e.innerText.replace(/\s+/g, ' ').trim())
      : null;
  }
  const indicator = pane.querySelector('[data-cy="viewport-overlay-bottom-right"] [title="Instance Number"]');
  out.indicator = indicator ? indicator.innerText.replace(/\s+/g, ' ').trim() : null;
  return out;
}

// Runs in the page: true once the active viewport shows an image that is not one flat colour.
function imageShown() {
  const canvas = document.querySelector(
    '[data-cy="viewport-pane"][data-is-active="true"] canvas.cornerstone-canvas');
  if (!canvas || !canvas.width) return false;
  const ctx = canvas.getContext('2d', { willReadFrequently: true });
  if (!ctx) return true; // not readable here; canvasStats() copies it and the test judges
  const { data } = ctx.getImageData(0, 0, canvas.width, canvas.height);
  const seen = new Set();
  for (let i = 0; i < data.length; i += 4 * 7) {
    seen.add((data[i] << 16) | (data[i + 1] << 8) | data[i + 2]);
    if (seen.size >= 3) return true;
  }
  return false;
}

const inPage = (fn, arg) => page.evaluate(fn, arg);
const canvasNow = () => inPage(() => window.__gwTest.canvasStats());
const overlayNow = () => inPage(() => window.__gwTest.overlayTexts());

async function shoot(page, name) {
  const file = path.join(plan.outDir, `${name}.png`);
  try {
    await page.screenshot({ path: file, timeout: 10000 });
    result.screenshots[name] = file;
  } catch (err) {
    result.screenshots[name] = `screenshot failed: ${err}`;
  }
}

const launchOptions = {
  executablePath: '/usr/bin/chromium',
  headless: true,
  timeout: plan.stepTimeoutMs,
  args: [
    '--no-sandbox', // the tests run as root
    // Cornerstone renders with WebGL: SwiftShader gives it a software GPU.
    '--use-gl=angle', '--use-angle=swiftshader', '--enable-unsafe-swiftshader', '--ignore-gpu-blocklist',
    // No connections of Chromium's own (updates, sync, field trials): the tests' network is loopback.
    '--disable-background-networking', '--disable-component-update', '--disable-sync',
    '--disable-default-apps', '--no-first-run', '--disable-quic', '--disable-features=Translate,MediaRouter',
  ],
};

let browser = null;
let page = null;
let gatewayQuiet = null;
try {
  browser = await chromium.launch(launchOptions);
  const context = await browser.newContext({ viewport: { width: 1600, height: 1000 }, serviceWorkers: 'block' });
  context.setDefaultTimeout(plan.stepTimeoutMs);
  // The in-page helpers, in every document the page loads.
  await context.addInitScript(
    `window.__gwTest = { canvasStats: ${canvasStats}, overlayTexts: ${overlayTexts}, imageShown: ${imageShown},
      studyRows: ${studyRows}, dataSourceError: ${dataSourceError} };`);
  page = await context.newPage();

  // What the browser asks of the DICOMweb server, and what it got.
  const isRecorded = url => url.startsWith(plan.record + '/');
  let inFlight = 0;
  let lastActivity = Date.now();
  page.on('request', request => {
    if (isRecorded(request.url())) { inFlight++; lastActivity = Date.now(); }
  });
  const settled = request => {
    if (isRecorded(request.url())) { inFlight--; lastActivity = Date.now(); }
  };
  page.on('requestfinished', settled);
  page.on('requestfailed', settled);
  // Resolves once no request to the DICOMweb server has been open for `quietMs`.
  gatewayQuiet = async (quietMs = 750) => {
    const deadline = Date.now() + plan.stepTimeoutMs;
    while (inFlight > 0 || Date.now() - lastActivity < quietMs) {
      if (Date.now() > deadline) throw new Error(`requests to ${plan.record} still open: ${inFlight}`);
      await new Promise(resolve => setTimeout(resolve, 100));
    }
  };
  page.on('requestfinished', async request => {
    if (!isRecorded(request.url())) return;
    const response = await request.response();
    const headers = response ? await response.allHeaders() : {};
    result.requests.push({
      method: request.method(), path: template(request.url()), url: request.url(),
      accept: request.headers()['accept'] || null, status: response ? response.status() : null,
      contentType: headers['content-type'] || null, type: request.resourceType(),
    });
  });
  page.on('requestfailed', request => {
    const failure = { method: request.method(), url: request.url(), error: request.failure()?.errorText };
    result.failedRequests.push(failure);
    if (isRecorded(request.url())) {
      result.requests.push({
        method: request.method(), path: template(request.url()), url: request.url(),
        accept: request.headers()['accept'] || null, status: null, error: failure.error,
        type: request.resourceType(),
      });
    }
  });
  page.on('console', msg => {
    if (msg.type() === 'error') result.consoleErrors.push(msg.text().slice(0, 1000));
  });
  page.on('pageerror', err => result.pageErrors.push(String(err).slice(0, 1000)));

  // CORS preflights and CORS failures are only visible through the DevTools protocol.
  const cdp = await context.newCDPSession(page);
  await cdp.send('Network.enable');
  const cdpUrls = new Map();
  cdp.on('Network.requestWillBeSent', e => {
    cdpUrls.set(e.requestId, e.request.url);
    if (e.request.method === 'OPTIONS' && isRecorded(e.request.url)) {
      const h = Object.fromEntries(Object.entries(e.request.headers).map(([k, v]) => [k.toLowerCase(), v]));
      result.preflights.push({
        path: template(e.request.url), requestMethod: h['access-control-request-method'] || null,
        requestHeaders: h['access-control-request-headers'] || null, origin: h['origin'] || null,
      });
    }
  });
  cdp.on('Network.loadingFailed', e => {
    if (e.corsErrorStatus) {
      result.corsErrors.push({
        url: cdpUrls.get(e.requestId) || null, error: e.corsErrorStatus.corsError,
        parameter: e.corsErrorStatus.failedParameter || null,
      });
    }
  });

  // 1. The study list.
  result.studyList = await step('study list', async () => {
    await page.goto(plan.site + '/', { waitUntil: 'domcontentloaded' });
    await page.waitForFunction(n => window.__gwTest.studyRows().length >= n || window.__gwTest.dataSourceError(),
      plan.studyCount, { polling: 200 });
    const sourceError = await inPage(() => window.__gwTest.dataSourceError());
    if (sourceError) throw new Error(`the viewer reports a data source error: ${sourceError}`);
    return page.evaluate(() => {
      const headerRow = [...document.querySelectorAll('thead tr')]
        .find(tr => [...tr.cells].some(c => c.innerText.trim() === 'Patient'));
      const headers = headerRow ? [...headerRow.cells].map(c => c.innerText.trim()) : [];
      const rows = window.__gwTest.studyRows().map(tr => [...tr.cells].map(c => c.innerText.trim()));
      return { headers, rows };
    });
  });
  result.webgl = await page.evaluate(() => {
    const gl = document.createElement('canvas').getContext('webgl2');
    if (!gl) return null;
    const ext = gl.getExtension('WEBGL_debug_renderer_info');
    return ext ? gl.getParameter(ext.UNMASKED_RENDERER_WEBGL) : gl.getParameter(gl.RENDERER);
  });

  // 2. Select a study: the side panel lists its series (a series-level search).
  result.selection = await step('select study', async () => {
    await page.locator('tbody tr', { hasText: plan.open.accession }).first().click();
    await page.waitForFunction(
      n => [...document.querySelectorAll('tbody tr')].filter(tr => tr.cells.length === 2).length >= n,
      plan.open.seriesCount, { polling: 200 });
    return page.evaluate(() => ({
      series: [...document.querySelectorAll('tbody tr')].filter(tr => tr.cells.length === 2)
        .map(tr => [...tr.cells].map(c => c.innerText.replace(/\s+/g, ' ').trim())),
    }));
  });

  // 3. Open it in the viewer through the "Basic Viewer" button, and wait for a real image.
  result.viewer = await step('open study in viewer', async () => {
    await page.getByRole('button', { name: 'Basic Viewer' }).first().click();
    await page.waitForURL(/\/viewer\?/);
    await page.waitForFunction(() => window.__gwTest.imageShown(), null, { polling: 250 });
    const shown = { url: page.url(), canvas: await canvasNow(), overlay: await overlayNow() };
    // Let the viewer finish fetching the study (it prefetches every frame): leaving the page
    // earlier would abort those requests and hide how they went.
    await gatewayQuiet();
    return shown;
  });

  // 4. The multi-frame instance: open it, then scroll past frame 1 with the mouse wheel.
  result.multiframe = await step('multi-frame', async () => {
    const mf = plan.multiframe;
    const t0 = Date.now();
    const marks = {};
    await page.goto(`${plan.site}/viewer?StudyInstanceUIDs=${mf.studyUID}&initialSeriesInstanceUID=${mf.seriesUID}`,
      { waitUntil: 'domcontentloaded' });
    await page.waitForFunction(() => window.__gwTest.imageShown(), null, { polling: 250 });
    await page.waitForFunction(() => /\(1\/\d+\)/.test(window.__gwTest.overlayTexts().indicator || ''),
      null, { polling: 200 });
    marks.frame1 = Date.now() - t0;
    const before = { canvas: await canvasNow(), overlay: await overlayNow() };
    const box = await page.locator('[data-cy="viewport-pane"][data-is-active="true"] canvas.cornerstone-canvas')
      .boundingBox();
    await page.mouse.move(box.x + box.width / 2, box.y + box.height / 2);
    for (let i = 0; i < mf.scrolls; i++) {
      await page.mouse.wheel(0, 120);
      await page.waitForTimeout(100);
    }
    // Wait until the indicator has left frame 1 and the canvas shows something else than before.
    await page.waitForFunction(
      beforeHash => {
        const t = window.__gwTest;
        if (/\(1\/\d+\)/.test(t.overlayTexts().indicator || '')) return false;
        const s = t.canvasStats();
        return !!s && s.hash !== beforeHash;
      },
      before.canvas ? before.canvas.hash : null, { polling: 250 });
    marks.scrolled = Date.now() - t0;
    const after = { canvas: await canvasNow(), overlay: await overlayNow() };
    await gatewayQuiet(); // every request of the run has its answer in the report
    marks.done = Date.now() - t0;
    return { url: page.url(), before, after, marks };
  });
  result.ok = true;
} catch (err) {
  if (!result.error) result.error = String(err && err.stack ? err.stack : err).slice(0, 4000);
  if (page) {
    await shoot(page, 'failure');
    result.atFailure = {
      url: page.url(),
      canvas: await page.evaluate(() => window.__gwTest && window.__gwTest.canvasStats()).catch(e => String(e)),
      overlay: await page.evaluate(() => window.__gwTest && window.__gwTest.overlayTexts()).catch(e => String(e)),
      studyRows: await page.evaluate(() => window.__gwTest && window.__gwTest.studyRows()
        .map(tr => [...tr.cells].map(c => c.innerText.trim()))).catch(e => String(e)),
      text: await page.evaluate(() => document.body.innerText.slice(0, 2000)).catch(e => String(e)),
    };
  }
} finally {
  result.ms = Date.now() - started;
  if (browser) await browser.close().catch(() => {});
}
finish(result.ok ? 0 : 1);
