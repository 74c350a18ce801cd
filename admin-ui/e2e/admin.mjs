// End-to-end run of the admin UI in headless Chromium (Playwright), against a running relay.
// `tests/admin_ui.rs` starts the relay and a mock upstream, runs this script and then checks
// through the API what the clicks did. Screenshots of each page go to SCREENSHOTS.
//
// Environment: ADMIN_URL, PROXY_URL, UPSTREAM_URL, ADMIN_PASSWORD (user `admin`), ADMIN_TOKEN
// (the static token, for set-ups the clicks do not cover), SCREENSHOTS, CHROMIUM (default
// /usr/bin/chromium). Prints one JSON line with what the Rust side checks.
import assert from 'node:assert/strict'
import { mkdirSync, rmSync } from 'node:fs'
import { readFile } from 'node:fs/promises'
import { createServer } from 'node:http'
import { join } from 'node:path'
import { chromium } from 'playwright-core'

const env = (name, fallback) => {
  const v = process.env[name] ?? fallback
  if (v === undefined) throw new Error(`${name} is not set`)
  return v
}
const ADMIN = env('ADMIN_URL')
const PROXY = env('PROXY_URL')
const UPSTREAM = env('UPSTREAM_URL')
const PASSWORD = env('ADMIN_PASSWORD')
const TOKEN = env('ADMIN_TOKEN')
const SHOTS = env('SCREENSHOTS')
const CREDENTIAL = 'sk-ant-api03-ui-test-credential-0123456789'
const REFRESH_TOKEN = 'sk-ant-ort01-ui-refresh-token-0123456789'
rmSync(SHOTS, { recursive: true, force: true })
mkdirSync(SHOTS, { recursive: true })

const browser = await chromium.launch({
  executablePath: env('CHROMIUM', '/usr/bin/chromium'),
  args: ['--no-sandbox', '--disable-dev-shm-usage'],
})
const context = await browser.newContext({ viewport: { width: 1400, height: 900 } })
const page = await context.newPage()
const pageErrors = []
page.on('pageerror', (e) => pageErrors.push(String(e)))
page.on('console', (m) => {
  // The refusals the run provokes on purpose (wrong password, a bad setting) log 4xx loads.
  if (m.type() === 'error' && !/status of 40[013]/.test(m.text())) pageErrors.push(m.text())
})
// Answers for window.prompt / confirm, taken in order; a dialog nobody expected fails the run.
const answers = []
page.on('dialog', async (d) => {
  const a = answers.shift()
  if (a === undefined) {
    pageErrors.push(`unexpected dialog: ${d.message()}`)
    await d.dismiss()
  } else {
    await d.accept(a)
  }
})
// Bodies of the changes the page sends, to check that an edit sends only what changed.
const patches = []
page.on('request', (r) => {
  if (r.method() === 'PATCH') patches.push({ path: new URL(r.url()).pathname, body: r.postDataJSON() })
})
const lastPatch = (prefix) => patches.filter((p) => p.path.startsWith(prefix)).at(-1)?.body
const shot = (name) => page.screenshot({ path: join(SHOTS, `${name}.png`), fullPage: true })
const row = (table, name) => page.locator(`[data-test="${table}"] tr[data-name="${name}"]`)
const note = () => page.locator('[data-test="note"]')
const error = () => page.locator('[data-test="error"]')

/** A call to the admin API with the static token, outside the browser; the answer's JSON. */
async function adminApi(method, path, body) {
  const r = await fetch(`${ADMIN}${path}`, {
    method,
    headers: { authorization: `Bearer ${TOKEN}`, 'content-type': 'application/json' },
    body: body === undefined ? undefined : JSON.stringify(body),
  })
  const text = await r.text()
  assert.ok(r.ok, `${method} ${path}: ${r.status} ${text}`)
  return text ? JSON.parse(text) : null
}

/** Clicks Filter until the records table has `n` rows (the writer flushes every 100 ms here). */
async function waitRecords(n) {
  for (let i = 0; ; i++) {
    if ((await page.locator('[data-test="records"] [data-test="status"]').count()) >= n) return
    assert.ok(i < 50, `only ${await page.locator('[data-test="records"] [data-test="status"]').count()} of ${n} records showed`)
    await page.waitForTimeout(200)
    await page.click('button:has-text("Filter")')
  }
}

/** The page fits the test's 1400 px window: nothing to scroll sideways. */
async function fitsWidth(what) {
  const over = await page.evaluate(() => {
    const content = document.querySelector('.content')
    return Math.max(content.scrollWidth - content.clientWidth, document.documentElement.scrollWidth - window.innerWidth)
  })
  assert.ok(over <= 0, `${what} needs ${over} px more than the 1400 px window`)
}

async function login(user, password) {
  await page.goto(`${ADMIN}/`)
  await page.waitForURL(/#\/login/)
  await page.fill('input[name="username"]', user)
  await page.fill('input[name="password"]', password)
  await page.click('button[type="submit"]')
}

try {
  // The page comes with the relay, with its security headers.
  const res = await page.goto(`${ADMIN}/`)
  assert.equal(res.status(), 200)
  assert.match(res.headers()['content-security-policy'], /default-src 'self'/)
  assert.equal(res.headers()['x-frame-options'], 'DENY')

  // A wrong password is refused with the API's message, and nothing else opens.
  await login('admin', 'not-the-password')
  await error().waitFor()
  assert.match(await error().innerText(), /authentication required \(401\)/)
  await shot('01-login-refused')

  await login('admin', PASSWORD)
  await page.waitForURL(/#\/traffic/)
  assert.equal(await page.locator('[data-test="who"]').innerText(), 'admin (admin)')
  await page.locator('[data-test="breakdown"]', { hasText: 'No traffic in this range.' }).waitFor()
  await page.click('a[href="#/accounts"]')

  // An upstream account, created and then edited in the form.
  await page.click('[data-test="new-account"]')
  const form = page.locator('[data-test="account-form"]')
  await form.locator('input[name="name"]').fill('ui-claude')
  await form.locator('select[name="account_type"]').selectOption('claude')
  await form.locator('input[name="base_url"]').fill(UPSTREAM)
  await form.locator('input[name="credential"]').fill(CREDENTIAL)
  await form.locator('input[name="priority"]').fill('7')
  await form.locator('input[name="models"]').fill('claude-sonnet-4-5, claude-haiku-4-5')
  await page.click('[data-test="save-account"]')
  await note().filter({ hasText: 'Account ui-claude created.' }).waitFor()
  const account = row('accounts', 'ui-claude')
  const masked = await account.locator('[data-test="masked"]').innerText()
  assert.ok(!masked.includes('credential-0123'), `the credential shows: ${masked}`)
  assert.match(masked, /…/)
  assert.equal(await account.locator('[data-test="priority"]').innerText(), '7')
  await account.getByRole('button', { name: 'Edit' }).click()
  assert.equal(await form.locator('input[name="credential"]').inputValue(), '', 'a stored credential is never put back into the form')
  await form.locator('input[name="priority"]').fill('3')
  await page.click('[data-test="save-account"]')
  await note().filter({ hasText: 'Account ui-claude saved.' }).waitFor()
  await page.waitForFunction(() => document.querySelector('[data-test="accounts"] tr[data-name="ui-claude"] [data-test="priority"]')?.textContent === '3')
  assert.deepEqual(lastPatch('/api/admin/accounts/'), { priority: 3 })
  // A bad value is refused in the page, before any call.
  await account.getByRole('button', { name: 'Edit' }).click()
  await form.locator('input[name="weight"]').fill('')
  await page.click('[data-test="save-account"]')
  await error().filter({ hasText: 'Weight must be a whole number of at least 1' }).waitFor()
  await form.getByRole('button', { name: 'Cancel' }).click()
  // Checked by hand: the mock upstream answers, so it passes.
  await account.getByRole('button', { name: 'Check' }).click()
  await note().filter({ hasText: 'ui-claude: check passed (HTTP 200)' }).waitFor()
  await fitsWidth('the accounts page')
  await shot('02-accounts')

  // A user priced at 1.5 × list, and a key for them with a daily limit.
  await page.click('a[href="#/users"]')
  await page.click('[data-test="new-user"]')
  const userForm = page.locator('[data-test="user-form"]')
  await userForm.locator('input[name="username"]').fill('ui-tenant')
  await userForm.locator('input[name="password"]').fill('tenant-password-1')
  await userForm.locator('input[name="price_rate"]').fill('1.5')
  await page.click('[data-test="create-user"]')
  await note().filter({ hasText: 'User ui-tenant created.' }).waitFor()
  assert.equal(await row('users', 'ui-tenant').locator('[data-test="rate"]').innerText(), '×1.5')
  // A price rate in a form of the page (no browser prompt), checked as typed by the API's
  // rules: a multiplier of at least 0 in ten-thousandths, so at most four decimals.
  const rateForm = page.locator('[data-test="rate-form"]')
  const rateHint = rateForm.locator('[data-test="rate-hint"]')
  const saveRate = rateForm.locator('[data-test="save-rate"]')
  await row('users', 'ui-tenant').getByRole('button', { name: 'Rate' }).click()
  assert.equal(await rateForm.locator('input[name="rate"]').inputValue(), '1.5')
  assert.match(await rateForm.innerText(), /Price rate of ui-tenant/)
  for (const [typed, said] of [['cheap', 'not a price rate'], ['-1', 'not a price rate'], ['1.23456', 'more than 4 decimals'], ['', 'not a price rate']]) {
    await rateForm.locator('input[name="rate"]').fill(typed)
    await rateHint.filter({ hasText: said }).waitFor()
    assert.ok(await saveRate.isDisabled(), `${typed} can be sent`)
  }
  await rateForm.locator('input[name="rate"]').fill('2.0001')
  await rateHint.filter({ hasText: '200.01% of list price' }).waitFor()
  await shot('03a-users-rate')
  await saveRate.click()
  await note().filter({ hasText: 'Price rate of ui-tenant set to ×2.0001.' }).waitFor()
  assert.equal(await rateForm.count(), 0)
  assert.equal(await row('users', 'ui-tenant').locator('[data-test="rate"]').innerText(), '×2.0001')
  // Every user's rate at once, then the ticked users'.
  await page.click('[data-test="all-rate"]')
  assert.match(await rateForm.innerText(), /Price rate of every user \(2\)/)
  await rateForm.locator('input[name="rate"]').fill('1')
  await saveRate.click()
  await note().filter({ hasText: 'Price rate of all 2 users set to ×1.' }).waitFor()
  assert.equal(await row('users', 'ui-tenant').locator('[data-test="rate"]').innerText(), '×1')
  await row('users', 'ui-tenant').locator('input[type="checkbox"]').check()
  assert.equal(await page.locator('[data-test="selected-count"]').innerText(), '1 selected on this page')
  await page.click('[data-test="batch-rate"]')
  assert.match(await rateForm.innerText(), /Price rate of the 1 selected user /)
  await rateForm.locator('input[name="rate"]').fill('1.5')
  await saveRate.click()
  await note().filter({ hasText: '1 price rate set to ×1.5.' }).waitFor()
  assert.equal(await row('users', 'ui-tenant').locator('[data-test="rate"]').innerText(), '×1.5')
  assert.equal(await page.locator('[data-test="selection"]').count(), 0)
  // A new password, typed in a password field.
  await row('users', 'ui-tenant').getByRole('button', { name: 'Password' }).click()
  await page.fill('[data-test="password-form"] input[name="new_password"]', 'tenant-password-2')
  await page.click('[data-test="password-form"] button[type="submit"]')
  await note().filter({ hasText: 'Password of ui-tenant changed.' }).waitFor()
  // Cost limits over all of the user's keys.
  await row('users', 'ui-tenant').getByRole('button', { name: 'Limits' }).click()
  await page.fill('[data-test="limits-form"] input[name="user_daily_cost_limit"]', '20')
  await page.fill('[data-test="limits-form"] input[name="user_monthly_cost_limit"]', '300')
  await page.click('[data-test="save-limits"]')
  await note().filter({ hasText: 'Limits of ui-tenant set.' }).waitFor()
  assert.equal(await row('users', 'ui-tenant').locator('[data-test="cost-limits"]').innerText(), '$20.00 a day\n$300.00 a month')
  assert.deepEqual(lastPatch('/api/admin/users/'), { daily_cost_limit: 20000000, monthly_cost_limit: 300000000 })
  // The platforms and models of all the user's keys: only what changed is sent.
  await row('users', 'ui-tenant').getByRole('button', { name: 'Limits' }).click()
  await page.check('[data-test="limits-form"] input[name="user_platform_claude"]')
  await page.fill('[data-test="limits-form"] input[name="user_allowed_models"]', 'claude-*, ui-model')
  await page.click('[data-test="save-limits"]')
  await note().filter({ hasText: 'Limits of ui-tenant set.' }).waitFor()
  assert.deepEqual(lastPatch('/api/admin/users/'), { allowed_platforms: ['claude'], allowed_models: ['claude-*', 'ui-model'] })
  await row('users', 'ui-tenant').locator('[data-test="user-models"]').waitFor()
  assert.equal(
    await row('users', 'ui-tenant').locator('[data-test="cost-limits"]').innerText(),
    '$20.00 a day\n$300.00 a month\nplatforms: claude\nmodels: claude-*, ui-model',
  )
  // Lifted again, so the tenant's requests below are not held to them.
  await row('users', 'ui-tenant').getByRole('button', { name: 'Limits' }).click()
  await page.uncheck('[data-test="limits-form"] input[name="user_platform_claude"]')
  await page.fill('[data-test="limits-form"] input[name="user_allowed_models"]', '')
  await page.click('[data-test="save-limits"]')
  await row('users', 'ui-tenant').locator('[data-test="user-models"]').waitFor({ state: 'detached' })
  assert.deepEqual(lastPatch('/api/admin/users/'), { allowed_platforms: [], allowed_models: [] })
  // What the tenant was billed this month, beside its limits: nothing yet.
  assert.equal(await row('users', 'ui-tenant').locator('[data-test="user-billed-month"]').innerText(), '$0.00')
  await fitsWidth('the users page')
  await shot('03-users')

  // Ticks belong to the page shown: another page starts with none, so a batch never changes
  // users out of sight. A second page: the list answers as if 50 more users existed (made up in
  // the browser; real ones would take a minute to hash their passwords).
  const usersList = (url) => url.pathname === '/api/admin/users'
  let template = null
  await page.route(usersList, async (route) => {
    const real = await route.fetch()
    const body = await real.json()
    const asked = Number(new URL(route.request().url()).searchParams.get('page') ?? '1')
    template = body.items[0] ?? template
    body.total += 50
    if (asked > 1) {
      body.page = asked
      body.items = Array.from({ length: 50 }, (_, i) => ({ ...template, id: `ghost-${i}`, username: `ui-ghost-${i}` }))
    }
    await route.fulfill({ response: real, json: body })
  })
  await page.reload()
  await row('users', 'ui-tenant').locator('input[type="checkbox"]').check()
  await page.click('[data-test="select-page"]')
  assert.equal(await page.locator('[data-test="selected-count"]').innerText(), '2 selected on this page')
  await page.click('[data-test="batch-rate"]')
  await page.getByRole('button', { name: 'Next ›' }).click()
  await row('users', 'ui-ghost-49').waitFor()
  assert.equal(await page.locator('[data-test="selection"]').count(), 0)
  assert.equal(await rateForm.count(), 0, 'the batch form stays open for users no longer shown')
  await row('users', 'ui-ghost-7').locator('input[type="checkbox"]').check()
  await page.getByRole('button', { name: '‹ Previous' }).click()
  await row('users', 'ui-tenant').waitFor()
  assert.equal(await page.locator('[data-test="selection"]').count(), 0)
  assert.equal(await page.locator('[data-test="users"] input[type="checkbox"]:checked').count(), 0)
  await shot('03b-users-pages')
  await page.unroute(usersList)

  await page.click('a[href="#/keys"]')
  await page.click('[data-test="new-key"]')
  const keyForm = page.locator('[data-test="key-form"]')
  await keyForm.locator('input[name="owner"]').fill('ui-tenant')
  await keyForm.locator('input[name="name"]').fill('ui-key')
  await keyForm.locator('input[name="daily_cost_limit"]').fill('5')
  await keyForm.locator('input[name="monthly_cost_limit"]').fill('50')
  await page.click('[data-test="save-key"]')
  const plaintext = (await page.locator('[data-test="plaintext"]').innerText()).trim()
  assert.match(plaintext, /^sk-relay-/)
  await shot('04-key-created')
  assert.equal(await row('keys', 'ui-key').locator('[data-test="daily-limit"]').innerText(), '$5.00 a day')
  assert.equal(await row('keys', 'ui-key').locator('[data-test="monthly-limit"]').innerText(), '$50.00 a month')
  // Edited: a rate limit added, the other limits kept as they were.
  await row('keys', 'ui-key').getByRole('button', { name: 'Edit' }).click()
  assert.equal(await keyForm.locator('input[name="daily_cost_limit"]').inputValue(), '5')
  assert.equal(await keyForm.locator('input[name="monthly_cost_limit"]').inputValue(), '50')
  await keyForm.locator('input[name="rpm_limit"]').fill('120')
  await page.click('[data-test="save-key"]')
  await note().filter({ hasText: 'Key ui-key saved.' }).waitFor()
  await row('keys', 'ui-key').locator('td', { hasText: '120 rpm' }).waitFor()
  assert.deepEqual(lastPatch('/api/admin/api-keys/'), { rpm_limit: 120 })

  // The key made in the browser works at the proxy, against the account made in the browser.
  const proxied = await fetch(`${PROXY}/v1/messages`, {
    method: 'POST',
    headers: { 'content-type': 'application/json', 'x-api-key': plaintext, 'anthropic-version': '2023-06-01' },
    body: JSON.stringify({ model: 'claude-sonnet-4-5', max_tokens: 64, messages: [{ role: 'user', content: 'hello from the admin UI test' }] }),
  })
  const answerText = await proxied.text()
  assert.equal(proxied.status, 200, answerText)
  const answer = JSON.parse(answerText)

  // Its record shows up on the records page (the writer flushes every 100 ms here).
  await page.click('[data-test="created-key"] >> text=Done')
  await row('keys', 'ui-key').getByRole('link', { name: 'Requests' }).click()
  await page.waitForURL(/#\/records\?api_key_id=/)
  await waitRecords(1)
  assert.equal(await page.locator('[data-test="records"] [data-test="status"]').first().innerText(), '200')
  assert.equal(await page.locator('[data-test="records"] [data-test="input"]').first().innerText(), String(answer.usage.input_tokens))
  // The record names its user, key and account; the page says whose requests it shows.
  const served = page.locator('[data-test="records"] tbody tr').first()
  assert.equal(await served.locator('[data-test="user"]').innerText(), 'ui-tenant')
  assert.equal(await served.locator('[data-test="key"]').innerText(), 'ui-key')
  assert.equal(await served.locator('[data-test="account"]').innerText(), 'ui-claude')
  // And the provider's ids: of the request, as its answer's head gave it, and of the answer.
  assert.equal(await served.locator('[data-test="upstream-request-id"]').innerText(), proxied.headers.get('request-id'))
  assert.equal(await served.locator('[data-test="response-id"]').innerText(), answer.id)
  assert.equal((await page.locator('[data-test="scope"]').innerText()).trim(), 'of key ui-key')
  await shot('05-records')

  // A key deleted since its request: the record shows the start of its id, marked deleted.
  const tenantId = (await adminApi('GET', '/api/admin/users?per_page=500')).items.find((u) => u.username === 'ui-tenant').id
  const gone = await adminApi('POST', '/api/admin/api-keys', { user_id: tenantId, name: 'ui-gone', allowed_models: ['no-such-model'] })
  const refused = await fetch(`${PROXY}/v1/messages`, {
    method: 'POST',
    headers: { 'content-type': 'application/json', 'x-api-key': gone.key, 'anthropic-version': '2023-06-01' },
    body: JSON.stringify({ model: 'claude-sonnet-4-5', max_tokens: 64, messages: [{ role: 'user', content: 'refused' }] }),
  })
  assert.equal(refused.status, 403, await refused.text())
  await adminApi('DELETE', `/api/admin/api-keys/${gone.id}`)
  await page.click('a[href="#/records"]')
  await page.waitForURL(/#\/records$/)
  await waitRecords(2)
  const refusedRow = page.locator('[data-test="records"] tbody tr', { has: page.locator('[data-test="key"] [data-test="deleted"]') })
  assert.equal(await refusedRow.count(), 1)
  assert.equal(await refusedRow.locator('[data-test="key"]').innerText(), `${gone.id.slice(0, 8)}… deleted`)
  assert.equal(await refusedRow.locator('[data-test="user"]').innerText(), 'ui-tenant')
  assert.equal(await refusedRow.locator('[data-test="account"]').innerText(), '—')
  // A name leads to that entity's records, filtered by its id.
  await refusedRow.locator('[data-test="user"] a').click()
  await page.waitForURL(new RegExp(`#/records\\?user_id=${tenantId}$`))
  assert.equal(await page.inputValue('input[name="user_id"]'), tenantId)
  await page.locator('[data-test="scope"]', { hasText: 'of user ui-tenant' }).waitFor()
  assert.equal(await page.locator('[data-test="records"] [data-test="status"]').count(), 2)
  // The same records as CSV, through the browser's download, with the filter the page shows.
  const [download] = await Promise.all([page.waitForEvent('download'), page.click('[data-test="export"]')])
  assert.equal(download.suggestedFilename(), 'usage-records.csv')
  const csv = (await readFile(await download.path(), 'utf8')).trim().split('\r\n')
  assert.equal(csv.length, 3, csv.join('\n'))
  const csvHeader = csv[0].split(',')
  assert.ok(csvHeader.includes('billed_cost_usd') && csvHeader.includes('account_name'), csv[0])
  assert.ok(csv.slice(1).every((line) => line.split(',')[csvHeader.indexOf('user_name')] === 'ui-tenant'), csv.join('\n'))
  // For Excel: the same file behind a UTF-8 byte order mark.
  const [excel] = await Promise.all([page.waitForEvent('download'), page.click('[data-test="export-excel"]')])
  const excelBytes = await readFile(await excel.path())
  assert.deepEqual([...excelBytes.subarray(0, 3)], [0xef, 0xbb, 0xbf])
  assert.equal(excelBytes.subarray(3).toString('utf8').trim().split('\r\n').join('\n'), csv.join('\n'))
  await fitsWidth('the records page')
  await shot('05b-records-named')

  // The overview: the request, per account and per user.
  await page.click('a[href="#/traffic"]')
  await row('breakdown', 'ui-claude').waitFor()
  assert.equal(await row('breakdown', 'ui-claude').locator('[data-test="requests"]').innerText(), '1')
  const accountBilled = await row('breakdown', 'ui-claude').locator('[data-test="billed"]').innerText()
  await page.selectOption('select[name="by"]', 'user')
  await row('breakdown', 'ui-tenant').waitFor()
  assert.equal(await row('breakdown', 'ui-tenant').locator('[data-test="billed"]').innerText(), accountBilled)
  // A range the API refuses: its message, and no table of the range before it.
  await page.fill('input[name="from"]', '2026-02-10')
  await page.fill('input[name="to"]', '2026-02-01')
  await page.click('button:has-text("Show")')
  await error().filter({ hasText: 'from must not be after to' }).waitFor()
  assert.equal(await page.locator('[data-test="breakdown"]').count(), 0)
  assert.equal(await page.locator('[data-test="traffic"] [data-test="billed"]').first().innerText(), accountBilled)
  await shot('06-overview')

  // The conversation's binding to the account, and ending it.
  await page.click('a[href="#/sessions"]')
  await page.locator('[data-test="sessions"] [data-test="account"]', { hasText: 'ui-claude' }).waitFor()
  await shot('07-sessions')
  answers.push('')
  await page.locator('[data-test="sessions"]').getByRole('button', { name: 'Unbind' }).click()
  await note().filter({ hasText: 'Binding ended.' }).waitFor()
  await page.locator('[data-test="sessions"]', { hasText: 'No active sessions.' }).waitFor()

  // A price override.
  await page.click('a[href="#/pricing"]')
  await page.click('[data-test="new-price"]')
  const priceForm = page.locator('[data-test="price-form"]')
  await priceForm.locator('input[name="model"]').fill('ui-model-1')
  await priceForm.locator('input[name="input"]').fill('3')
  await priceForm.locator('input[name="output"]').fill('15')
  await priceForm.locator('input[name="web_search"]').fill('10')
  await page.click('[data-test="save-price"]')
  await note().filter({ hasText: 'Price of ui-model-1 saved.' }).waitFor()
  assert.equal(await row('prices', 'ui-model-1').locator('[data-test="input"]').innerText(), '$3.00')
  assert.equal(await row('prices', 'ui-model-1').locator('[data-test="web_search"]').innerText(), '$10.00')
  // A cache price left unset shows what is billed: 1.25 × the input price.
  assert.equal(await row('prices', 'ui-model-1').locator('[data-test="cache_write_5m"]').innerText(), '$3.75 1.25 × input')
  // A flex card set through the API, which the form's next save must keep.
  const setFlex = await page.evaluate(async () => {
    const me = await (await fetch('/api/auth/me')).json()
    const res = await fetch('/api/admin/pricing', {
      method: 'POST',
      headers: { 'content-type': 'application/json', 'x-csrf-token': me.csrf_token },
      body: JSON.stringify({ model: 'ui-model-1', input: 3000000, output: 15000000, web_search: 10000, flex: { input: 1500000, output: 7500000 } }),
    })
    return res.status
  })
  assert.equal(setFlex, 200)
  await page.reload()
  await row('prices', 'ui-model-1').locator('[data-test="tiers"]', { hasText: 'flex $1.50 / $7.50' }).waitFor()
  // Long prompts at prices of their own, then the shipped card of a model priced by length.
  await row('prices', 'ui-model-1').getByRole('button', { name: 'Override', exact: true }).click()
  assert.equal(await priceForm.locator('input[name="input"]').inputValue(), '3')
  await priceForm.locator('select[name="long"]').selectOption('own')
  await priceForm.locator('input[name="above_tokens"]').fill('200000')
  await priceForm.locator('input[name="long_input"]').fill('6')
  await priceForm.locator('input[name="long_output"]').fill('22.5')
  await page.click('[data-test="save-price"]')
  await note().filter({ hasText: 'Price of ui-model-1 saved.' }).waitFor()
  await row('prices', 'ui-model-1').locator('[data-test="long_context"]', { hasText: 'over 200,000: $6.00 / $22.50' }).waitFor()
  assert.equal(await row('prices', 'ui-model-1').locator('[data-test="long_source"]').innerText(), 'override')
  assert.equal(await row('prices', 'claude-haiku-5-5').locator('[data-test="long_context"]').innerText(), 'over 100,000: $0.50 / $2.50')
  // Gemini 2.5 bills grounding per request that searched, Gemini 3 per search.
  assert.equal(await row('prices', 'gemini-2.5-pro').locator('[data-test="web_search"]').innerText(), '$35.00 per 1 000 requests that search')
  assert.equal(await row('prices', 'gemini-3-pro-preview').locator('[data-test="web_search"]').innerText(), '$14.00')
  // The flex card set through the API came back into the form, and the save kept it.
  assert.match(await row('prices', 'ui-model-1').locator('[data-test="tiers"]').innerText(), /flex \$1\.50 \/ \$7\.50/)
  // The tiers' cards in the form: a priority card of its own, the flex card dropped, and the
  // long card's own priority card.
  await row('prices', 'ui-model-1').getByRole('button', { name: 'Override', exact: true }).click()
  assert.equal(await priceForm.locator('select[name="flex"]').inputValue(), 'own')
  assert.equal(await priceForm.locator('input[name="flex_input"]').inputValue(), '1.5')
  assert.equal(await priceForm.locator('select[name="priority"]').inputValue(), 'shipped')
  await priceForm.locator('select[name="priority"]').selectOption('own')
  await priceForm.locator('input[name="priority_input"]').fill('6')
  await priceForm.locator('input[name="priority_output"]').fill('30')
  await priceForm.locator('select[name="flex"]').selectOption('none')
  assert.equal(await priceForm.locator('select[name="long"]').inputValue(), 'own')
  await priceForm.locator('select[name="long_priority"]').selectOption('own')
  await priceForm.locator('input[name="long_priority_input"]').fill('12')
  await priceForm.locator('input[name="long_priority_output"]').fill('45')
  await page.click('[data-test="save-price"]')
  await note().filter({ hasText: 'Price of ui-model-1 saved.' }).waitFor()
  await row('prices', 'ui-model-1').locator('[data-test="tiers"]', { hasText: 'priority $6.00 / $30.00' }).waitFor()
  assert.doesNotMatch(await row('prices', 'ui-model-1').locator('[data-test="tiers"]').innerText(), /flex/)
  assert.equal(await row('prices', 'ui-model-1').locator('[data-test="long_priority"]').innerText(), 'priority $12.00 / $45.00')
  const stored = await page.evaluate(async () => (await (await fetch('/api/admin/pricing')).json()).items.find((p) => p.model === 'ui-model-1'))
  assert.deepEqual([stored.priority.input, stored.flex, stored.long_context.priority.output], [6000000, null, 45000000])
  // A price change the list schedules shows under the model until it takes effect: Gemini
  // 3.8 Flash's introductory price ends on 2027-01-01.
  const changeShown = await row('prices', 'gemini-3.8-flash').locator('[data-test="change"]').allInnerTexts()
  if (Date.now() < Date.UTC(2027, 0, 1)) {
    assert.deepEqual(changeShown, ['from 2027-01-01: $1.50 / $7.50, cache read $0.15'])
    assert.equal(await row('prices', 'gemini-3.8-flash').locator('[data-test="input"]').innerText(), '$0.75')
    // An override opened on it says what it does to the change.
    await row('prices', 'gemini-3.8-flash').getByRole('button', { name: 'Override', exact: true }).click()
    await priceForm.locator('[data-test="schedule-warning"]', { hasText: 'from 2027-01-01' }).waitFor()
    await priceForm.getByRole('button', { name: 'Cancel' }).click()
  } else {
    assert.deepEqual(changeShown, [])
    assert.equal(await row('prices', 'gemini-3.8-flash').locator('[data-test="input"]').innerText(), '$1.50')
  }
  // A shipped row's search price is left to the price list in the form ($10 / 1 000 here).
  await row('prices', 'claude-haiku-5-5').getByRole('button', { name: 'Override', exact: true }).click()
  assert.equal(await priceForm.locator('input[name="web_search"]').inputValue(), '')
  await priceForm.getByRole('button', { name: 'Cancel' }).click()
  // An override scheduled ahead: listed under the model until its time, cancelled there.
  await row('prices', 'ui-model-1').getByRole('button', { name: 'Override', exact: true }).click()
  await priceForm.locator('input[name="input"]').fill('4')
  await priceForm.locator('input[name="output"]').fill('20')
  await priceForm.locator('input[name="from"]').fill('2100-01-01')
  await page.click('[data-test="save-price"]')
  await note().filter({ hasText: 'Price of ui-model-1 scheduled from 2100-01-01.' }).waitFor()
  const scheduledLine = row('prices', 'ui-model-1').locator('[data-test="scheduled-override"]')
  assert.match(await scheduledLine.innerText(), /^override from 2100-01-01: \$4\.00 \/ \$20\.00/)
  assert.equal(await row('prices', 'ui-model-1').locator('[data-test="input"]').innerText(), '$3.00', 'the price in effect is unchanged')
  answers.push('')
  await scheduledLine.getByRole('button', { name: 'cancel' }).click()
  await note().filter({ hasText: 'Scheduled override of ui-model-1 cancelled.' }).waitFor()
  assert.equal(await row('prices', 'ui-model-1').locator('[data-test="scheduled-override"]').count(), 0)
  // The shipped long card's own tier cards show too (GPT-5.6: 2× its long card at priority).
  assert.equal(await row('prices', 'gpt-5.6').locator('[data-test="long_priority"]').innerText(), 'priority $20.00 / $90.00')
  // Renamed in the form, the override is another model's: the tier choices go back to the price list's.
  await row('prices', 'ui-model-1').getByRole('button', { name: 'Override', exact: true }).click()
  assert.equal(await priceForm.locator('select[name="priority"]').inputValue(), 'own')
  await priceForm.locator('input[name="model"]').fill('ui-model-2')
  await page.waitForFunction(() => document.querySelector('select[name="priority"]').value === 'shipped')
  await priceForm.getByRole('button', { name: 'Cancel' }).click()
  // A tier card without its output price is refused in the form, before any request.
  await row('prices', 'ui-model-1').getByRole('button', { name: 'Override', exact: true }).click()
  await priceForm.locator('select[name="fast"]').selectOption('own')
  await priceForm.locator('input[name="fast_input"]').fill('9')
  await priceForm.locator('input[name="fast_output"]').evaluate((e) => e.removeAttribute('required'))
  await page.click('[data-test="save-price"]')
  await page.locator('.error', { hasText: 'Fast mode (Anthropic): output is required' }).waitFor()
  await shot('08-pricing-form')
  await priceForm.getByRole('button', { name: 'Cancel' }).click()
  await shot('08-pricing')
  // The model filter ignores case.
  await page.fill('input[name="model_filter"]', 'UI-Model')
  await page.waitForFunction(() => document.querySelectorAll('[data-test="prices"] tbody tr').length === 1)
  await row('prices', 'ui-model-1').waitFor()
  await page.fill('input[name="model_filter"]', 'SONNET-4-5')
  await row('prices', 'claude-sonnet-4-5').waitFor()
  assert.equal(await row('prices', 'ui-model-1').count(), 0)
  await page.fill('input[name="model_filter"]', '')

  // After a reload the session goes on, and so do changes (the CSRF token comes back).
  await page.click('a[href="#/accounts"]')
  await page.waitForURL(/#\/accounts$/) // the router's move, before the reload
  await page.reload()
  await row('accounts', 'ui-claude').waitFor()
  await row('accounts', 'ui-claude').getByRole('button', { name: 'Disable' }).click()
  await note().filter({ hasText: 'Account ui-claude disabled.' }).waitFor()
  await row('accounts', 'ui-claude').locator('[data-test="state"]', { hasText: 'disabled' }).waitFor()
  // A login in another tab replaces the session both tabs share: this tab's next change
  // still goes through, with the new session's CSRF token.
  const other = await context.newPage()
  await other.goto(`${ADMIN}/#/login`)
  await other.fill('input[name="username"]', 'admin')
  await other.fill('input[name="password"]', PASSWORD)
  await other.click('button[type="submit"]')
  await other.waitForURL(/#\/traffic/)
  await other.close()
  await row('accounts', 'ui-claude').getByRole('button', { name: 'Enable' }).click()
  await note().filter({ hasText: 'Account ui-claude enabled.' }).waitFor()
  await row('accounts', 'ui-claude').getByRole('button', { name: 'Disable' }).click()
  await note().filter({ hasText: 'Account ui-claude disabled.' }).waitFor()
  await row('accounts', 'ui-claude').locator('[data-test="state"]', { hasText: 'disabled' }).waitFor()

  // An OAuth account (kept disabled: it serves nothing here) with its refresh token, and a
  // refresh by hand at the mock's token endpoint.
  await page.click('[data-test="new-account"]')
  await form.locator('input[name="name"]').fill('ui-oauth')
  await form.locator('select[name="account_type"]').selectOption('claude-official')
  await form.locator('input[name="credential"]').fill('sk-ant-oat01-ui-access-token-0123456789')
  await form.locator('input[name="refresh_token"]').fill(REFRESH_TOKEN)
  await form.locator('input[name="token_expires_at"]').fill('2030-01-01T10:00')
  await form.locator('input[name="enabled"]').uncheck()
  await page.click('[data-test="save-account"]')
  await note().filter({ hasText: 'Account ui-oauth created.' }).waitFor()
  assert.match(await row('accounts', 'ui-oauth').locator('[data-test="token"]').innerText(), /^expires in \d+ days$/)
  await row('accounts', 'ui-oauth').getByRole('button', { name: 'Refresh token' }).click()
  await note().filter({ hasText: 'ui-oauth: token refreshed' }).waitFor()
  await row('accounts', 'ui-oauth').locator('[data-test="token"]', { hasText: /^expires in (7 h 5\d|8 h 0) min$/ }).waitFor()
  await shot('02b-accounts-oauth')
  // Its type changed: refused while its refresh token would stay, done once it is removed.
  await row('accounts', 'ui-oauth').getByRole('button', { name: 'Edit' }).click()
  await form.locator('select[name="account_type"]').selectOption('claude')
  await page.click('[data-test="save-account"]')
  await error().filter({ hasText: 'needs refresh_token too' }).waitFor()
  await form.locator('input[name="drop_refresh_token"]').check()
  await page.click('[data-test="save-account"]')
  await note().filter({ hasText: 'Account ui-oauth saved.' }).waitFor()
  assert.deepEqual(lastPatch('/api/admin/accounts/'), { account_type: 'claude', refresh_token: null })
  await row('accounts', 'ui-oauth').locator('[data-test="token"]', { hasText: '—' }).waitFor()

  // The widest row an account makes: a long name and address, many models, a concurrency
  // limit, an OAuth token, errors from a failed check and every action. It still fits, with
  // what scheduling reads in its own columns. Its upstream refuses every credential.
  const refusing = createServer((_, res) => {
    res.writeHead(401, { 'content-type': 'application/json' })
    res.end(JSON.stringify({ type: 'error', error: { type: 'authentication_error', message: 'invalid x-api-key' } }))
  })
  await new Promise((done) => refusing.listen(0, '127.0.0.1', done))
  refusing.unref() // the relay's pooled connections to it must not keep the run alive
  const wide = await adminApi('POST', '/api/admin/accounts', {
    name: 'ui-wide-account-with-a-rather-long-name',
    type: 'claude-official',
    base_url: `http://127.0.0.1:${refusing.address().port}/a/rather/long/prefix/for/the/upstream`,
    credential: 'sk-ant-oat01-ui-wide-access-token-0123456789',
    refresh_token: 'sk-ant-ort01-ui-wide-refresh-token-0123456789',
    token_expires_at: Date.now() + 30 * 86_400_000,
    models: ['claude-opus-4-1', 'claude-opus-4-5', 'claude-sonnet-4', 'claude-sonnet-4-5', 'claude-haiku-4-5', 'claude-3-5-haiku-latest'],
    max_concurrency: 100000,
    weight: 10000,
    priority: 1000,
  })
  await page.reload()
  const widest = row('accounts', 'ui-wide-account-with-a-rather-long-name')
  // Checks that fail in a row put it in error (at the account error threshold, 5 here).
  for (let i = 1; !(await widest.getByRole('button', { name: 'Clear error' }).count()); i++) {
    assert.ok(i <= 5, 'five failed checks left the account valid')
    await widest.getByRole('button', { name: 'Check' }).click()
    await widest.locator('[data-test="state"]', { hasText: `${i} error` }).waitFor()
  }
  await fitsWidth('the accounts page with its widest row')
  assert.equal(await widest.locator('[data-test="concurrency"]').innerText(), '100000')
  assert.equal(await widest.locator('[data-test="weight"]').innerText(), '10000')
  assert.match(await widest.locator('[data-test="state"]').innerText(), /^error\s+5 errors$/)
  await shot('02c-accounts-wide')
  await adminApi('DELETE', `/api/admin/accounts/${wide.id}`)
  refusing.closeAllConnections()
  refusing.close()

  // The health check job, switched on every 10 minutes.
  await page.click('a[href="#/settings"]')
  const settings = page.locator('[data-test="settings"]')
  await settings.locator('input[name="interval"]').fill('0')
  await page.click('[data-test="save-settings"]')
  await error().filter({ hasText: 'account_health_check_interval is in minutes' }).waitFor()
  await settings.locator('input[name="enabled"]').check()
  await settings.locator('input[name="interval"]').fill('10')
  await page.click('[data-test="save-settings"]')
  await note().filter({ hasText: 'Settings saved.' }).waitFor()

  await page.click('a[href="#/audit"]')
  await page.locator('[data-test="audit"] [data-test="action"]', { hasText: 'account.token_refresh' }).waitFor()
  await shot('09-audit')

  // A key an admin disabled: its owner sees why and gets no Enable button (below).
  await page.click('a[href="#/keys"]')
  await row('keys', 'ui-key').getByRole('button', { name: 'Disable' }).click()
  await note().filter({ hasText: 'Key ui-key disabled.' }).waitFor()
  await row('keys', 'ui-key').locator('[data-test="disabled-by-admin"]').waitFor()

  // Logged out, the pages ask for a login again.
  await page.click('[data-test="logout"]')
  await page.waitForURL(/#\/login/)
  await page.goto(`${ADMIN}/#/accounts`)
  await page.waitForURL(/#\/login/)

  // A plain user sees their own keys and usage, and no admin pages.
  await login('ui-tenant', 'tenant-password-2')
  await page.waitForURL(/#\/keys/)
  await row('keys', 'ui-key').waitFor()
  assert.equal(await page.locator('a[href="#/accounts"]').count(), 0)
  assert.equal(await row('keys', 'ui-key').locator('[data-test="requests"]').innerText(), '1')
  // What the month billed, which its monthly limit is measured against.
  assert.match(await row('keys', 'ui-key').locator('[data-test="billed-month"]').innerText(), /^\$0\.\d+$/)
  await row('keys', 'ui-key').locator('[data-test="disabled-by-admin"]').waitFor()
  assert.equal(await row('keys', 'ui-key').getByRole('button', { name: 'Enable' }).count(), 0)
  await page.goto(`${ADMIN}/#/accounts`)
  await page.waitForURL(/#\/keys/)
  // Their requests name the key, the deleted one by the start of its id.
  await page.click('a[href="#/records"]')
  await page.locator('[data-test="records"] [data-test="key"]', { hasText: 'ui-key' }).waitFor()
  assert.equal(await page.locator('[data-test="records"] [data-test="key"] [data-test="deleted"]').count(), 1)
  assert.equal(await page.locator('[data-test="records"] [data-test="user"]').count(), 0)
  await page.click('a[href="#/overview"]')
  await page.locator('[data-test="summary"]').waitFor()
  // The cost limit the admin set over all of the tenant's keys, with what it measures.
  assert.match(await page.locator('[data-test="cost-limits"]').innerText(), /of \$20\.00 today/)
  assert.match(await page.locator('[data-test="monthly-limit"]').innerText(), /^\$0\.\d+ of \$300\.00 in \d{4}-\d{2} \(resets on the first at 00:00 UTC\)$/)
  await shot('10-tenant-usage')

  assert.deepEqual(pageErrors, [])
  console.log(JSON.stringify({ ok: true, key: plaintext, credential: CREDENTIAL, refresh_token: REFRESH_TOKEN }))
} catch (e) {
  await shot('failure').catch(() => {})
  console.error(e)
  console.error('page errors:', pageErrors)
  process.exitCode = 1
} finally {
  await browser.close()
}
