// The page a scanned web login code opens (web_login.page): WeChat passes the ticket
// as `scene`. It tells the browser the code was scanned, then logs the browser in as
// this user, or refuses, at the user's tap. The handlers return their promises only
// so that the package's tests can wait for them.
const { auth } = getApp();

Page({
  data: { state: 'loading', error: '' },

  onLoad(options) {
    this.scene = (options && options.scene) || '';
    // Logs in with wx.login() first when no session is stored.
    return auth
      .scanWebLogin(this.scene)
      .then(() => this.setData({ state: 'asking', error: '' }))
      .catch((err) => this.showError(err));
  },

  confirm() {
    return auth
      .confirmWebLogin(this.scene)
      .then(() => this.setData({ state: 'confirmed', error: '' }))
      .catch((err) => this.showError(err));
  },

  deny() {
    return auth
      .denyWebLogin(this.scene)
      .then(() => this.setData({ state: 'denied', error: '' }))
      .catch((err) => this.showError(err));
  },

  // err: the server's {code, detail} (ticket_expired: the code on the screen is too
  // old; scan a new one) and the HTTP status.
  showError(err) {
    this.setData({ state: 'failed', error: `${err.status} ${err.code}: ${err.detail}` });
  },
});
