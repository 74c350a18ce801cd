import { ref, type Ref } from 'vue'
import { ApiError, api, query, type Page } from './api'

/**
 * Overlapping loads of one view: only the latest may show, so an older answer arriving late is
 * dropped. `begin()` starts a load and returns a check that it is still the latest.
 */
export function latestLoad(): () => () => boolean {
  let latest = 0
  return () => {
    const n = ++latest
    return () => n === latest
  }
}

/** A paginated list from the admin API, with its loading error. */
export function usePaged<T>(path: () => string, filters: () => Record<string, string | number | null | undefined> = () => ({})) {
  const rows: Ref<T[]> = ref([])
  const page = ref(1)
  const perPage = ref(50)
  const total = ref(0)
  const error = ref<string | null>(null)
  const loading = ref(false)
  // The filters of the rows shown (set once their answer is in).
  const applied: Ref<Record<string, string | number | null | undefined>> = ref({})
  const begin = latestLoad()

  async function load(to = page.value) {
    const current = begin()
    loading.value = true
    try {
      const wanted = filters()
      const p = await api.get<Page<T>>(path() + query({ ...wanted, page: to, per_page: perPage.value }))
      if (!current()) return
      const last = Math.max(1, Math.ceil(p.total / perPage.value))
      if (!p.items.length && p.page > last) {
        // The rows of this page went (deleted here or elsewhere): the new last page instead.
        return load(last)
      }
      rows.value = p.items
      total.value = p.total
      page.value = p.page
      applied.value = wanted
      error.value = null
    } catch (e) {
      if (current()) error.value = message(e)
    } finally {
      if (current()) loading.value = false
    }
  }
  return { rows, page, perPage, total, error, loading, load, applied }
}

export function message(e: unknown): string {
  if (e instanceof ApiError) return e.status ? `${e.message} (${e.status})` : e.message
  return e instanceof Error ? e.message : String(e)
}

/**
 * Changes made from a page: each runs, then the page reloads, then what was done shows in
 * `note` (the text the change returned, else `done`), or the API's error in `error`.
 */
export function useActions(reload: () => Promise<unknown>, error: Ref<string | null> = ref(null)) {
  const note = ref<string | null>(null)
  async function act(what: () => Promise<unknown>, done: string | null): Promise<boolean> {
    try {
      const said = await what()
      await reload()
      note.value = typeof said === 'string' ? said : done
      error.value = null
      return true
    } catch (e) {
      error.value = message(e)
      return false
    }
  }
  return { note, error, act }
}
