import { defineConfig } from 'vite'
import vue from '@vitejs/plugin-vue'

// `npm run dev` proxies the API to a relay's admin port (RELAY_ADMIN_URL, default the
// embedded default 127.0.0.1:8081); `npm run build` writes dist/, which the relay embeds.
const admin = process.env.RELAY_ADMIN_URL ?? 'http://127.0.0.1:8081'

export default defineConfig({
  plugins: [vue()],
  build: { outDir: 'dist', emptyOutDir: true, sourcemap: false, chunkSizeWarningLimit: 400 },
  server: { proxy: { '/api': admin, '/metrics': admin } },
})
