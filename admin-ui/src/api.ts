// The admin API client. The UI talks to the relay's admin service only, through these calls:
// cookie session from `POST /api/auth/login`, and the CSRF token it answers sent on every
// state-changing call.
import { reactive } from 'vue'

export type Role = 'admin' | 'user'

export interface Me {
  user_id: string | null
  name: string
  role: Role
  csrf_token?: string | null
}

export interface Page<T> {
  items: T[]
  total: number
  page: number
  per_page: number
}

export interface Account {
  id: string
  name: string
  account_type: string
  base_url: string | null
  credential_masked: string | null
  has_refresh_token: boolean
  priority: number
  weight: number
  models: string[]
  model_map: Record<string, string>
  max_concurrency: number | null
  enabled: boolean
  status: string
  consecutive_error_count: number
  cooldown_until: number | null
  last_used_at: number | null
  created_at?: number
  /** OAuth accounts: the access token's expiry (epoch ms), when known. */
  token_expires_at: number | null
  token_refreshed_at: number | null
  /** Why the last token refresh failed. */
  token_refresh_error: string | null
  /** The provider refused the refresh token: new tokens are needed. */
  token_refresh_refused: boolean
  /** Type-specific data: `chatgpt_account_id` of an `openai-responses` account. */
  extra: Record<string, unknown>
}

export interface User {
  id: string
  username: string
  role: Role
  enabled: boolean
  price_rate: number
  daily_cost_limit: number | null
  monthly_cost_limit: number | null
  total_cost_limit: number | null
  /** Platforms and models every key of the user may use; empty: all. */
  allowed_platforms: string[]
  allowed_models: string[]
  created_at: number
  /** In the admin list: billed micro-USD over all the user's keys, what its limits measure. */
  billed_cost_today?: number
  billed_cost_month?: number
  billed_cost?: number
}

export interface ApiKey {
  id: string
  user_id: string
  username: string
  name: string
  key_prefix: string
  enabled: boolean
  disabled_by_admin: boolean
  expires_at: number | null
  allowed_platforms: string[]
  allowed_models: string[]
  rpm_limit: number | null
  max_concurrency: number | null
  daily_cost_limit: number | null
  monthly_cost_limit: number | null
  total_cost_limit: number | null
  created_at: number
  last_used_at?: number | null
  requests?: number
  billed_cost?: number
  billed_cost_today?: number
  billed_cost_month?: number
}

export interface Price {
  model: string
  input: number
  output: number
  cache_write_5m: number | null
  cache_write_1h: number | null
  cache_read: number | null
  /** Micro-USD per web search; null: searches are not billed. */
  web_search: number | null
  /** Micro-USD once per request that searched (Gemini 2.5's grounded prompts), from the price list. */
  web_search_request: number | null
  /** The prices of prompts longer than `above_tokens`; null: one price at every length. */
  long_context: LongContextPrice | null
  /** The shipped price list's long-prompt card, which an override keeps unless it sets one. */
  shipped_long_context: LongContextPrice | null
  /** The prices of requests served at the priority / flex tier; null: the standard prices. */
  priority: TierPrice | null
  flex: TierPrice | null
  /** Anthropic fast mode's prices; null: the standard prices. */
  fast: TierPrice | null
  /** The shipped tier cards, which an override keeps unless it sets its own. */
  shipped_priority: TierPrice | null
  shipped_flex: TierPrice | null
  shipped_fast: TierPrice | null
  /** Price changes scheduled after now, in date order: the model's whole prices from `from_ms` on. */
  changes: PriceChange[]
  /** No price in effect now: priced only from its first change (its prices here are 0). */
  unpriced: boolean
  /** Overrides an admin scheduled that have not begun (each also in `changes`). */
  scheduled: { from_ms: number; input: number; output: number; updated_at: number }[]
  override: boolean
  updated_at: number | null
}

export interface PriceChange {
  from_ms: number
  price: {
    input: number
    output: number
    cache_write_5m?: number
    cache_write_1h?: number
    cache_read?: number
    web_search?: number
    web_search_request?: number
    long_context?: LongContextPrice
    priority?: TierPrice
    flex?: TierPrice
    fast?: TierPrice
  }
}

export interface TierPrice {
  input: number
  output: number
  cache_write_5m?: number | null
  cache_write_1h?: number | null
  cache_read?: number | null
}

export interface LongContextPrice {
  above_tokens: number
  input: number
  output: number
  cache_write_5m?: number | null
  cache_write_1h?: number | null
  cache_read?: number | null
  /** Long prompts served at a tier: their own card; absent: this card at that tier too. */
  priority?: TierPrice | null
  flex?: TierPrice | null
  fast?: TierPrice | null
}

export interface Totals {
  requests: number
  input_tokens: number
  output_tokens: number
  cache_write_tokens: number
  cache_read_tokens: number
  base_cost?: number
  billed_cost: number
}

/** Today, this month and all time (`/api/usage/summary`, `/api/admin/usage/summary`). */
export interface Summary {
  day: string
  month: string
  today: Totals
  this_month: Totals
  all_time: Totals
  /** A user's own summary: the cost limits over all their keys (micro-USD; null: none). */
  daily_cost_limit?: number | null
  monthly_cost_limit?: number | null
  total_cost_limit?: number | null
}

export interface UsageRecord {
  id: string
  request_id: string
  created_at: number
  user_id?: string | null
  api_key_id: string | null
  account_id?: string | null
  /** What the user, key and account are called now; null once deleted (admins see all three). */
  user_name?: string | null
  api_key_name: string | null
  account_name?: string | null
  protocol: string
  requested_model: string | null
  upstream_model: string | null
  stream: boolean
  status: number
  input_tokens: number
  output_tokens: number
  cache_read_tokens: number
  web_search_requests: number
  billed_cost: number
  base_cost?: number
  latency_ms: number
  ttfb_ms: number | null
  error_type: string | null
  unpriced: boolean
  estimated: boolean
  /** The provider's service tier for the request (priority, flex, standard); null: not named. */
  service_tier: string | null
  /** The provider's id of the request (Anthropic request-id, OpenAI x-request-id). */
  upstream_request_id: string | null
  /** The id of the answer (msg_…, chatcmpl-…, resp_…, Gemini's responseId). */
  response_id: string | null
  /** Passes on other models (an advisor's): in the cost, not in the token counts. */
  passes: { model: string; input_tokens: number; output_tokens: number; cache_write_5m_tokens: number; cache_write_1h_tokens: number; cache_read_tokens: number }[] | null
}

export interface AuditEntry {
  id: string
  at: number
  actor: string
  action: string
  target: string
  detail: unknown
}

/** An answer that was not 2xx, with the admin API's own error message. */
export class ApiError extends Error {
  constructor(
    public status: number,
    message: string,
  ) {
    super(message)
  }
}

/** Who is logged in (null: nobody); the UI's one piece of shared state. */
export const session = reactive<{ me: Me | null; checked: boolean }>({ me: null, checked: false })

async function call<T>(method: string, path: string, body?: unknown, retried = false): Promise<T> {
  const headers: Record<string, string> = { accept: 'application/json' }
  if (body !== undefined) headers['content-type'] = 'application/json'
  if (method !== 'GET' && session.me?.csrf_token) headers['x-csrf-token'] = session.me.csrf_token
  const res = await fetch(path, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
    credentials: 'same-origin',
  })
  const text = await res.text()
  let data: any = null
  try {
    data = text ? JSON.parse(text) : null
  } catch {
    data = null
  }
  if (!res.ok) {
    if (res.status === 401 && path !== '/api/auth/login') session.me = null
    const message = data?.error?.message ?? (text || res.statusText)
    // A login in another tab replaced this tab's session (the cookie is shared): take the new
    // session's CSRF token and try the change once more.
    if (res.status === 403 && method !== 'GET' && !retried && /CSRF/.test(message)) {
      const me = await fetch('/api/auth/me', { credentials: 'same-origin' })
      if (me.ok) {
        session.me = (await me.json()) as Me
        return call<T>(method, path, body, true)
      }
    }
    throw new ApiError(res.status, message)
  }
  return data as T
}

export const api = {
  get: <T>(path: string) => call<T>('GET', path),
  post: <T>(path: string, body?: unknown) => call<T>('POST', path, body ?? {}),
  patch: <T>(path: string, body: unknown) => call<T>('PATCH', path, body),
  del: <T>(path: string) => call<T>('DELETE', path),
}

/** A query string of the set values. */
export function query(params: Record<string, string | number | null | undefined>): string {
  const q = new URLSearchParams()
  for (const [k, v] of Object.entries(params)) {
    if (v !== null && v !== undefined && v !== '') q.set(k, String(v))
  }
  const s = q.toString()
  return s ? `?${s}` : ''
}

export async function login(username: string, password: string): Promise<void> {
  const answer = await api.post<{ user: { id: string; username: string; role: Role }; csrf_token: string }>(
    '/api/auth/login',
    { username, password },
  )
  session.me = {
    user_id: answer.user.id,
    name: answer.user.username,
    role: answer.user.role,
    csrf_token: answer.csrf_token,
  }
}

export async function logout(): Promise<void> {
  try {
    await api.post('/api/auth/logout')
  } finally {
    session.me = null
  }
}

/** Restores the session from the cookie after a reload. */
export async function restore(): Promise<void> {
  try {
    session.me = await api.get<Me>('/api/auth/me')
  } catch {
    session.me = null
  } finally {
    session.checked = true
  }
}

// Formatting. Money is integer micro-USD, rates are ten-thousandths, times epoch ms.
export function usd(micro: number | null | undefined): string {
  if (micro === null || micro === undefined) return '—'
  const v = micro / 1_000_000
  return `$${v.toLocaleString('en-US', { minimumFractionDigits: 2, maximumFractionDigits: v !== 0 && Math.abs(v) < 1 ? 6 : 2 })}`
}

export function rate(r: number): string {
  return `×${(r / 10000).toFixed(4).replace(/0+$/, '').replace(/\.$/, '')}`
}

export function when(ms: number | null | undefined): string {
  if (!ms) return '—'
  return new Date(ms).toISOString().replace('T', ' ').slice(0, 19)
}

/** How far `ms` lies from now, roughly: "in 7 h 12 min", "3 min ago". */
export function fromNow(ms: number, now = Date.now()): string {
  const d = Math.abs(ms - now)
  const min = Math.round(d / 60_000)
  const text =
    min < 1 ? 'under a minute' : min < 60 ? `${min} min` : min < 48 * 60 ? `${Math.floor(min / 60)} h ${min % 60} min` : `${Math.round(min / 1440)} days`
  return ms >= now ? `in ${text}` : `${text} ago`
}

export function num(n: number | null | undefined): string {
  return n === null || n === undefined ? '—' : n.toLocaleString('en-US')
}

/** Micro-USD from a dollar amount typed in a form; null for an empty field. */
export function microFromUsd(s: string): number | null {
  const t = s.trim()
  if (!t) return null
  const v = Number(t)
  if (!Number.isFinite(v) || v < 0) throw new ApiError(0, `not an amount of dollars: ${s}`)
  return Math.round(v * 1_000_000)
}

/** A whole number of at least `min` typed in a form; `null` for an empty `optional` field. */
export function whole(v: unknown, what: string, min: number, optional = false): number | null {
  const t = String(v ?? '').trim()
  if (!t && optional) return null
  const n = Number(t)
  if (!t || !Number.isInteger(n) || n < min) {
    throw new ApiError(0, min > 0 ? `${what} must be a whole number of at least ${min}` : `${what} must be a whole number`)
  }
  return n
}

/** The fields of `now` that differ from `loaded` (all of them when nothing was loaded). */
export function changed(loaded: Record<string, unknown> | null, now: Record<string, unknown>): Record<string, unknown> {
  const out: Record<string, unknown> = {}
  for (const [k, v] of Object.entries(now)) {
    if (!loaded || JSON.stringify(loaded[k]) !== JSON.stringify(v)) out[k] = v
  }
  return out
}

/** A comma- or line-separated list typed in a form. */
export function list(s: string): string[] {
  return s
    .split(/[\n,]/)
    .map((x) => x.trim())
    .filter((x) => x)
}
