// Log in, show the user, call the data endpoint, log out: all through the package,
// which keeps the tokens, refreshes them (once, however many calls wait) and retries
// a refused call once. The handlers return their promises only so that the package's
// tests can wait for them.
const { auth } = getApp();

Page({
  data: { user: null, error: '' },

  onLoad() {
    // Logs in with wx.login() only when no session is stored.
    return this.showUser();
  },

  showUser() {
    return auth
      .user()
      .then((user) => this.setData({ user, error: '' }))
      .catch((err) => this.showError(err));
  },

  // Any authenticated call looks like this: request() adds the bearer token.
  callData() {
    return auth
      .request({ url: '/api/weixin/data/' })
      .then((res) => this.setData({ user: res.data.user, error: '' }))
      .catch((err) => this.showError(err));
  },

  signOut() {
    return auth
      .logout()
      .then(() => this.setData({ user: null, error: '' }))
      .catch((err) => this.showError(err));
  },

  // err: the server's {code, detail} and the HTTP status (0: no answer).
  showError(err) {
    this.setData({ error: `${err.status} ${err.code}: ${err.detail}` });
  },
});
