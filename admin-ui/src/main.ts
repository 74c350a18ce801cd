import { createApp } from 'vue'
import { createRouter, createWebHashHistory } from 'vue-router'
import App from './App.vue'
import { restore, session } from './api'
import './style.css'

const router = createRouter({
  history: createWebHashHistory(),
  routes: [
    // The start page depends on who is logged in, known only once the guard has restored
    // the session: the guard sends '/' on.
    { path: '/', component: { render: () => null } },
    { path: '/login', component: () => import('./views/Login.vue'), meta: { public: true } },
    { path: '/overview', component: () => import('./views/Overview.vue') },
    { path: '/traffic', component: () => import('./views/Traffic.vue'), meta: { admin: true } },
    { path: '/accounts', component: () => import('./views/Accounts.vue'), meta: { admin: true } },
    { path: '/users', component: () => import('./views/Users.vue'), meta: { admin: true } },
    { path: '/keys', component: () => import('./views/Keys.vue') },
    { path: '/pricing', component: () => import('./views/Pricing.vue'), meta: { admin: true } },
    { path: '/records', component: () => import('./views/Records.vue') },
    { path: '/audit', component: () => import('./views/Audit.vue'), meta: { admin: true } },
    { path: '/sessions', component: () => import('./views/Sessions.vue'), meta: { admin: true } },
    { path: '/settings', component: () => import('./views/Settings.vue'), meta: { admin: true } },
    { path: '/:rest(.*)', redirect: '/' },
  ],
})

router.beforeEach(async (to) => {
  if (!session.checked) await restore()
  if (to.meta.public) return true
  if (!session.me) return { path: '/login', query: { next: to.fullPath } }
  if (to.path === '/') return session.me.role === 'admin' ? '/traffic' : '/keys'
  if (to.meta.admin && session.me.role !== 'admin') return '/keys'
  return true
})

createApp(App).use(router).mount('#app')

export { router }
