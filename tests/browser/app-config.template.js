/** @type {AppTypes.Config} */
// OHIF viewer configuration for the browser tests (tests/browser/ohif_site.py renders it):
// one DICOMweb data source, the gateway. The quoted placeholders are replaced with
// JSON strings; everything else is served as written.
window.config = {
  name: 'dicomweb-gateway-tests',
  routerBasename: null,
  extensions: [],
  modes: [],
  // No onboarding tour: its pop-over would sit over the viewport in every fresh browser profile.
  customizationService: [{ 'ohif.tours': { $set: [] } }],
  showStudyList: true,
  maxNumberOfWebWorkers: 2,
  // The viewer is not served cross-origin isolated (no COOP/COEP): stack viewports need none.
  showWarningMessageForCrossOrigin: false,
  showCPUFallbackMessage: false,
  showLoadingIndicator: true,
  strictZSpacingForVolumeViewport: true,
  groupEnabledModesFirst: true,
  // A first-visit modal would sit over the study list in every fresh browser profile.
  investigationalUseDialog: { option: 'never' },
  maxNumRequests: { interaction: 100, thumbnail: 5, prefetch: 10 },
  showErrorDetails: 'always',
  defaultDataSourceName: 'gateway',
  dataSources: [
    {
      namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
      sourceName: 'gateway',
      configuration: {
        friendlyName: "__FRIENDLY_NAME__",
        name: 'gateway',
        qidoRoot: "__DICOMWEB_ROOT__",
        wadoRoot: "__DICOMWEB_ROOT__",
        wadoUriRoot: "__WADO_URI_ROOT__",
        qidoSupportsIncludeField: true,
        supportsReject: false,
        supportsStow: false,
        imageRendering: 'wadors',
        thumbnailRendering: 'wadors',
        enableStudyLazyLoad: true,
        supportsFuzzyMatching: false,
        supportsWildcard: true,
        staticWado: false,
        singlepart: 'bulkdata,video',
        bulkDataURI: {
          enabled: true,
          relativeResolution: 'studies',
        },
        omitQuotationForMultipartRequest: true,
      },
    },
  ],
};
